"""The table of ``lightning-adapt compare``: one row per recipe from its run's ``record.json``, as JSON and Markdown.

Every figure is measured in the run or read from the files it wrote: memory components exactly as the run's
``MemoryReportCallback`` measured them at fit end; peak memory ``torch.cuda.max_memory_allocated`` on GPU, the
process's peak resident set size on CPU with the interpreter baseline (resident memory when the config was
parsed, no model built) stated and taken off for the bars and ratios; median step time (the first step, a
warm-up, left out when there are more); throughput over the same steps; ``.ckpt``, adapter and merged sizes
as the weight files on disk. Ratios divide by the first recipe's figure.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from lightning_adapt.adapters.spectrum import ENERGIES
from lightning_adapt.compare.runner import Plan, Run
from lightning_adapt.memory.estimator import format_bytes, format_params

__all__ = ["RATIO_KEYS", "build_report", "markdown", "primary_metric", "run_row"]

#: Row fields divided by the first recipe's in ``ratios``.
RATIO_KEYS: tuple[str, ...] = ("trainable_params", "weights_bytes", "gradient_bytes", "optimizer_bytes")
RATIO_KEYS += ("peak_above_baseline_bytes", "median_step_s", "checkpoint_bytes")
_WEIGHT_FILES = ("*.safetensors", "*.bin")


def _weights_size(path: str | None) -> int | None:
    """Bytes of a checkpoint file, or of the weight files (safetensors / bin) of an exported directory."""
    if not path or not Path(path).exists():
        return None
    target = Path(path)
    if target.is_file():
        return target.stat().st_size
    return sum(f.stat().st_size for pattern in _WEIGHT_FILES for f in target.rglob(pattern))


def _timing(steps: list[dict[str, Any]]) -> dict[str, float | None]:
    """Median step time and samples / tokens per second, the first (warm-up) step left out when there are more."""
    timed = steps[1:] if len(steps) > 1 else steps
    if not timed:
        return {"median_step_s": None, "samples_per_s": None, "tokens_per_s": None}
    seconds = sum(float(s["step_time"]) for s in timed)
    tokens = [s.get("tokens") for s in timed]
    return {
        "median_step_s": statistics.median(float(s["step_time"]) for s in timed),
        "samples_per_s": sum(int(s["samples"]) for s in timed) / seconds if seconds else None,
        "tokens_per_s": sum(int(t) for t in tokens if t is not None) / seconds if seconds and all(tokens) else None,
    }


def _memory(record: dict[str, Any]) -> dict[str, Any]:
    memory: dict[str, int | None] = record.get("memory") or {}
    peak = record["peak"]
    above = peak["bytes"] - peak["baseline_bytes"] if peak.get("bytes") is not None else None
    parts = [memory.get(k) for k in ("weights", "gradients", "optimizer state")]
    other = max(above - sum(p or 0 for p in parts), 0) if above is not None else None
    by_kind: dict[str, int | None] = {
        k.removeprefix("weights: "): v for k, v in memory.items() if k.startswith("weights: ") and v
    }
    by_kind |= {"adapter": memory["adapter weights"]} if memory.get("adapter weights") else {}
    return {
        "weights_bytes": memory.get("weights"),
        "weights_by_kind": by_kind,
        "gradient_bytes": memory.get("gradients"),
        "optimizer_bytes": memory.get("optimizer state"),
        "peak_kind": peak["kind"],
        "peak_bytes": peak.get("bytes"),
        "baseline_bytes": peak["baseline_bytes"],
        "peak_above_baseline_bytes": above,
        "other_bytes": other,
    }


def run_row(run: Run) -> dict[str, Any]:
    """The report row of one run (a failed run: its name, recipe and error only)."""
    row: dict[str, Any] = {"name": run.name, "recipe": str(run.recipe), "seconds": run.seconds}
    row |= {"ok": run.error is None, "error": run.error, "log": str(run.log_path)}
    if run.error is not None:
        return row
    record = json.loads(run.record_path.read_text())
    params, files = record["params"], record.get("files") or {}
    steps = record["steps"]
    row |= {
        "method": record["method"],
        "device": record["device"],
        "trainable_params": params["trainable"],
        "total_params": params["total"],
        "trainable_pct": 100 * params["trainable"] / params["total"] if params["total"] else None,
        **_memory(record),
        **_timing(steps),
        "steps": record["global_step"],
        "metrics_before": record["metric_before"],
        "metrics_after": record["metric_after"],
        "metrics_after_step": record["metric_after_step"],
        "checkpoint_bytes": _weights_size(files.get("checkpoint")),
        "adapter_bytes": _weights_size(files.get("adapter")),
        "merged_bytes": _weights_size(files.get("merged")),
        "files": files,
        "loss_curve": {key: [s[key] for s in steps if s["loss"] is not None] for key in ("step", "time", "loss")},
        "estimate": record.get("estimate"),
        "no_estimate_reason": record.get("no_estimate_reason"),
        "lora": record.get("lora"),
    }  # fmt: skip
    return row


def _ratios(row: dict[str, Any], first: dict[str, Any]) -> dict[str, float | None]:
    def ratio(key: str) -> float | None:
        mine, theirs = row.get(key), first.get(key)
        return mine / theirs if mine is not None and theirs else None

    return {key: ratio(key) for key in RATIO_KEYS}


def build_report(plan: Plan, command: str, project: str | None, dtype: str | None) -> dict[str, Any]:
    """The report of the runs: how it was run, one row per recipe with its ratios against the first. The caller
    adds ``rank`` (adapter runs) and ``projection`` (with ``--project``) to the rows."""
    rows = [run_row(run) for run in plan.runs]
    for row in rows:
        row["ratios"] = _ratios(row, rows[0]) if row["ok"] and rows[0]["ok"] else {}
    return {"command": command, "overrides": plan.overrides, "project": project, "project_dtype": dtype, "runs": rows}


# --------------------------------------------------------------------------- Markdown


def _b(value: int | None) -> str:
    return format_bytes(value) if value is not None else "-"


def _f(value: float | None, spec: str = ".3g") -> str:
    return format(value, spec) if value is not None else "-"


def primary_metric(rows: list[dict[str, Any]]) -> str | None:
    """The metric the table shows: a validation metric other than the loss if there is one, else the loss."""
    keys = [k for row in rows if row["ok"] for k in row["metrics_after"] or row["metrics_before"]]
    return next((k for k in keys if "loss" not in k), keys[0] if keys else None)


def _change(row: dict[str, Any], key: str | None) -> str:
    before, after = row["metrics_before"].get(key), row["metrics_after"].get(key)
    return f"{_f(before, '.3f')} → {_f(after, '.3f')}"


def _peak_cell(row: dict[str, Any]) -> str:
    if row["peak_kind"] == "peak_rss":
        return f"{_b(row['peak_above_baseline_bytes'])} (RSS {_b(row['peak_bytes'])})"
    return _b(row["peak_bytes"])


def _main_table(rows: list[dict[str, Any]]) -> list[str]:
    metric = primary_metric(rows)
    head = "| recipe | method | trainable | weights | gradients | optimizer | peak | step (median) | samples/s "
    head += f"(tokens/s) | {metric or 'metric'} before → after | .ckpt | adapter | merged |"
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        if not r["ok"]:
            lines.append(f"| {r['name']} | FAILED: {r['error']} |" + " - |" * 11)
            continue
        kinds = " + ".join(f"{kind} {_b(v)}" for kind, v in r["weights_by_kind"].items())
        cells = [
            r["name"], r["method"], f"{format_params(r['trainable_params'])} ({r['trainable_pct']:.3g}%)",
            f"{_b(r['weights_bytes'])} ({kinds})", _b(r["gradient_bytes"]), _b(r["optimizer_bytes"]),
            _peak_cell(r), f"{_f(r['median_step_s'])} s", f"{_f(r['samples_per_s'])} ({_f(r['tokens_per_s'])})",
            _change(r, metric), _b(r["checkpoint_bytes"]), _b(r["adapter_bytes"]), _b(r["merged_bytes"]),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _ratio_table(rows: list[dict[str, Any]]) -> list[str]:
    labels = ("trainable", "weights", "gradients", "optimizer", "peak", "step time", ".ckpt")
    lines = [f"Ratios against `{rows[0]['name']}`:", "", "| recipe | " + " | ".join(labels) + " |"]
    lines.append("|---|" + "---:|" * len(labels))
    for r in rows:
        if r["ok"] and r["ratios"]:
            lines.append(f"| {r['name']} | " + " | ".join(_f(r["ratios"][k], ".3g") for k in RATIO_KEYS) + " |")
    return lines


def _metric_table(rows: list[dict[str, Any]]) -> list[str]:
    ok = [r for r in rows if r["ok"]]
    keys = list(dict.fromkeys(k for r in ok for k in [*r["metrics_before"], *r["metrics_after"]]))
    if not keys:
        return []
    lines = ["| metric (before → after) | " + " | ".join(r["name"] for r in ok) + " |", "|---|" + "---|" * len(ok)]
    lines += [f"| {key} | " + " | ".join(_change(r, key) for r in ok) + " |" for key in keys]
    return ["", *lines]


def _projection_table(report: dict[str, Any]) -> list[str]:
    name = report["project"]
    lines = ["", f"## Projected to {name}", ""]
    lines += ["| recipe | | trainable | weights | gradients | optimizer | activations | total | smallest GPU |"]
    lines += ["|---|---|---:|---:|---:|---:|---:|---:|---|"]
    notes = []
    for r in (r for r in report["runs"] if r["ok"]):
        measured = [_b(r[k]) for k in ("weights_bytes", "gradient_bytes", "optimizer_bytes")]
        trainable = format_params(r["trainable_params"])
        lines.append(
            f"| {r['name']} | measured | {trainable} | " + " | ".join(measured) + f" | - | {_peak_cell(r)} | |"
        )
        projection = r["projection"]
        if "error" in projection:
            lines.append(f"| {r['name']} | {name} | {projection['error']} |" + " |" * 6)
            continue
        e = projection["estimate"]
        cells = [format_params(e["trainable_params"]), *(_b(e[k]) for k in ("weights_bytes", "gradient_bytes"))]
        cells += [_b(e[k]) for k in ("optimizer_bytes", "activation_bytes", "total_bytes")]
        lines.append(f"| {r['name']} | {name} | " + " | ".join(cells) + f" | {e['smallest_gpu'] or '-'} |")
        notes += [f"- {r['name']}: {note}" for note in projection["notes"]]
    return lines + (["", *notes] if notes else [])


def _rank_section(rows: list[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    for r in (r for r in rows if r["ok"] and r.get("rank")):
        rank = r["rank"]
        lines += ["", f"### {r['name']}: rank of the learned update ΔW = scale·B A", ""]
        if "error" in rank:
            lines.append(rank["error"])
            continue
        energy = " | ".join(f"rank@{e * 100:g}% (max)" for e in ENERGIES)
        lines += [f"| layer type | layers | r | {energy} | suggested r |", "|---|---:|---:|---:|---:|---:|"]
        for s in rank["suggestions"]:
            of_type = [layer for layer in rank["layers"] if layer["layer_type"] == s["layer_type"]]
            used = " | ".join(str(max(la[f"effective_rank_{round(e * 100)}"] for la in of_type)) for e in ENERGIES)
            lines.append(f"| {s['layer_type']} | {s['layers']} | {s['r']} | {used} | {s['suggested_r']} |")
        lines += ["", *(f"- {s['sentence']}" for s in rank["suggestions"])]
    return ["", "## Rank diagnostics", *lines] if lines else []


def markdown(report: dict[str, Any], pictures: dict[str, str] | None = None) -> str:
    """``report.md``: the measured table, ratios, metrics, projection, rank diagnostics and picture links."""
    rows = report["runs"]
    ok = [r for r in rows if r["ok"]]
    lines = ["# lightning-adapt compare", "", f"`{report['command']}`", ""]
    if ok and ok[0]["peak_kind"] == "peak_rss":
        lines += [
            f"Peak: the process's peak resident set size above its interpreter baseline (resident memory when the "
            f"config was parsed, no model built: {_b(ok[0]['baseline_bytes'])} in the first run); RSS in brackets.",
            "",
        ]
    elif ok:
        lines += ["Peak: `torch.cuda.max_memory_allocated` of each run's own process.", ""]
    lines += _main_table(rows)
    steps = ", ".join(f"{r['name']} {r['steps']} steps in {r['seconds']:.0f}s" for r in ok)
    lines += ["", f"Memory components as each run's MemoryReportCallback measured them at fit end. Runs: {steps}."]
    if ok and rows[0]["ok"]:
        lines += ["", *_ratio_table(rows)]
    lines += _metric_table(rows)
    if report["project"]:
        lines += _projection_table(report)
    lines += _rank_section(rows)
    if pictures:
        lines += ["", "## Pictures", "", *(f"![{label}]({path})" for label, path in pictures.items())]
    return "\n".join(lines) + "\n"
