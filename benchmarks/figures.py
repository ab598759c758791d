"""``make figures``: run the comparisons the README quotes and write every measured figure it and docs/ show.

Each comparison is the documented ``lightning-adapt compare`` command, run as written into a scratch folder;
its ``report.md`` and pictures go to ``docs/figures/<name>/`` and the figures the docs quote to
``docs/figures/<name>/figures.json``. The README's blocks between ``<!-- figures:<name> -->`` and
``<!-- /figures:<name> -->`` are then rendered from that JSON. ``tests/cli/test_docs.py`` renders them again from
the committed JSON and fails on any difference, so no figure in those blocks can be edited by hand or drift.

Example:
    .venv/bin/python benchmarks/figures.py               # both comparisons (~25 min on 2 shared CPU cores)
    .venv/bin/python benchmarks/figures.py --only chat   # one of them
    .venv/bin/python benchmarks/figures.py --render      # re-render the README from the committed JSON only
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "docs" / "figures"
README = ROOT / "README.md"

#: name -> the arguments of ``lightning-adapt compare``, as the docs write them
COMPARISONS: dict[str, list[str]] = {
    "sentiment": [
        "recipes/sentiment/full.yaml", "recipes/sentiment/lora.yaml", "recipes/sentiment/qlora.yaml",
        "--trainer.max_steps", "60", "--project", "llama-2-7b",
    ],
    "chat": ["recipes/chat/full.yaml", "recipes/chat/lora.yaml", "recipes/chat/qlora.yaml"],
    "inits": ["recipes/chat/qlora.yaml", "recipes/chat/qlora-pissa.yaml", "recipes/chat/qlora-loftq.yaml"],
}  # fmt: skip
_KEPT = (
    "name", "method", "steps", "seconds", "trainable_params", "trainable_pct", "weights_bytes", "weights_by_kind",
    "gradient_bytes", "optimizer_bytes", "peak_above_baseline_bytes", "checkpoint_bytes", "adapter_bytes",
    "merged_bytes", "metrics_before", "metrics_after",
)  # fmt: skip


def run(name: str, scratch: Path) -> None:
    """Run comparison ``name`` and keep its report, pictures and quoted figures in ``docs/figures/<name>``."""
    out = scratch / name
    command = [str(Path(sys.executable).with_name("lightning-adapt")), "compare", *COMPARISONS[name]]
    start = time.perf_counter()
    subprocess.run([*command, "--output", str(out), "--overwrite"], cwd=ROOT, check=True)
    keep(name, out, (time.perf_counter() - start) / 60)


def keep(name: str, out: Path, minutes: float) -> None:
    """Keep the report, pictures and quoted figures of comparison ``name``, run into ``out``, in ``docs/figures/<name>``."""
    report = json.loads((out / "report.json").read_text())
    target = FIGURES / name
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for picture in [*(out / p for p in ("memory.png", "losses.png", "metrics.png")), *out.glob("rank-*.png")]:
        if picture.is_file():
            shutil.copy(picture, target / picture.name)
    text = (out / "report.md").read_text().replace(str(out) + "/", "")
    (target / "report.md").write_text(text)
    runs = [{key: row.get(key) for key in _KEPT} for row in report["runs"]]
    figures = {"command": "lightning-adapt compare " + " ".join(COMPARISONS[name]), "runs": runs}
    figures["minutes"] = round(minutes, 1)
    (target / "figures.json").write_text(json.dumps(figures, indent=1, sort_keys=True) + "\n")


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.1f} MB"


def _params(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def _change(row: dict[str, Any], key: str, spec: str = ".3f") -> str:
    before, after = row["metrics_before"].get(key), row["metrics_after"].get(key)
    return f"{before:{spec}} → {after:{spec}}" if before is not None and after is not None else "-"


def render_sentiment(figures: dict[str, Any]) -> str:
    """The README's sentiment table."""
    lines = [
        f"`{figures['command']}` ({figures['minutes']} min):",
        "",
        "| recipe | trainable | weights | gradients + AdamW state | peak above interpreter | val_acc before → after "
        "| val_f1 after | `.ckpt` |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in figures["runs"]:
        state = (r["gradient_bytes"] or 0) + (r["optimizer_bytes"] or 0)
        lines.append(
            f"| {r['name']} | {_params(r['trainable_params'])} ({r['trainable_pct']:.2f}%) | {_mb(r['weights_bytes'])} "
            f"| {_mb(state)} | {_mb(r['peak_above_baseline_bytes'])} | {_change(r, 'val_acc')} "
            f"| {r['metrics_after'].get('val_f1', float('nan')):.3f} | {_mb(r['checkpoint_bytes'])} |"
        )
    return "\n".join(lines)


def render_chat(figures: dict[str, Any]) -> str:
    """The README's chat table."""
    lines = [
        f"`{figures['command']}` ({figures['minutes']} min, the recipes' own {figures['runs'][0]['steps']} steps):",
        "",
        "| recipe | trainable | weights (4-bit part) | val_ppl before → after | `.ckpt` |",
        "|---|---|---|---|---|",
    ]
    for r in figures["runs"]:
        quantized = r["weights_by_kind"].get("quantized")
        weights = _mb(r["weights_bytes"]) + (f" ({_mb(quantized)})" if quantized else "")
        lines.append(
            f"| {r['name']} | {_params(r['trainable_params'])} ({r['trainable_pct']:.2f}%) | {weights} "
            f"| {_change(r, 'val_ppl', '.2f')} | {_mb(r['checkpoint_bytes'])} |"
        )
    return "\n".join(lines)


def render_inits(figures: dict[str, Any]) -> str:
    """The QLoRA initialisations' table, beside LoRA's run of the chat comparison (the same data and steps)."""
    lora = next(r for r in json.loads((FIGURES / "chat" / "figures.json").read_text())["runs"] if r["name"] == "lora")
    target = lora["metrics_after"]["val_ppl"]
    lines = [
        f"`{figures['command']}` ({figures['minutes']} min, the recipes' own {figures['runs'][0]['steps']} steps; "
        f"LoRA on the same data: val_ppl {_change(lora, 'val_ppl', '.2f')}, from the chat comparison):",
        "",
        "| recipe | weights (4-bit part) | val_ppl before → after | after vs LoRA's |",
        "|---|---|---|---|",
    ]
    for r in figures["runs"]:
        quantized = r["weights_by_kind"].get("quantized")
        weights = _mb(r["weights_bytes"]) + (f" ({_mb(quantized)})" if quantized else "")
        after = r["metrics_after"].get("val_ppl")
        versus = f"{100 * (after / target - 1):+.1f}%" if after is not None else "-"
        lines.append(f"| {r['name']} | {weights} | {_change(r, 'val_ppl', '.2f')} | {versus} |")
    return "\n".join(lines)


RENDER = {"sentiment": render_sentiment, "chat": render_chat, "inits": render_inits}


def rendered(text: str) -> str:
    """``text`` with every figures block rendered from ``docs/figures/<name>/figures.json``."""

    def block(match: re.Match[str]) -> str:
        name = match.group(1)
        figures = json.loads((FIGURES / name / "figures.json").read_text())
        return f"<!-- figures:{name} -->\n{RENDER[name](figures)}\n<!-- /figures:{name} -->"

    return re.sub(r"<!-- figures:(\w+) -->\n(?:.*?\n)?<!-- /figures:\1 -->", block, text, flags=re.S)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=sorted(COMPARISONS), action="append", help="run only these comparisons")
    parser.add_argument("--render", action="store_true", help="only re-render the README from docs/figures")
    parser.add_argument("--scratch", default=str(ROOT / "outputs" / "figures"), help="where the runs go")
    parser.add_argument("--keep", nargs=3, metavar=("NAME", "DIR", "MINUTES"), help="keep a finished compare run")
    args = parser.parse_args(argv)
    if args.keep:
        keep(args.keep[0], Path(args.keep[1]), float(args.keep[2]))
    elif not args.render:
        for name in args.only or list(COMPARISONS):
            run(name, Path(args.scratch))
    README.write_text(rendered(README.read_text()))


if __name__ == "__main__":
    main()
