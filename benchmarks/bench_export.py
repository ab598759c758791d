"""Export benchmark: merging a LoRA adapter into a ≥1B-parameter base, streamed (ours) vs PEFT's in-memory merge.

Claim checked: the streamed merge (:func:`lightning_adapt.export.stream_export.export_streamed`) never holds the
model, so its peak memory is bounded by a few copies of the largest tensor, not by the model, at no cost in
time. The base is a TinyLlama-shaped ``LlamaForCausalLM`` (hidden 2048, 22 layers, GQA 32/4 heads,
intermediate 5632, vocab 32000, untied: 1.10B parameters, 2.2 GB in bf16) with random weights, written tensor
by tensor into a temp dir (the generator holds one tensor at a time); the adapter is a random PEFT LoRA
directory (r=16, alpha=32 on q/k/v/o_proj, non-zero B). Each contender runs in its own process, so each has
its own peak:

* ``ours``: ``adapters_from_peft(adapter)`` + ``export_streamed(base, out, adapters)`` (dtype kept: bf16);
* ``peft``: ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=bf16), adapter)
  .merge_and_unload().save_pretrained(out)``.

Peak = the process's ``VmHWM`` (reset through ``/proc/self/clear_refs`` after the imports) minus its RSS after
the imports; time = wall clock of the export (reading the adapter included). Rounds alternate the order
(ours, peft / peft, ours) so machine load hits both alike. The outputs are compared tensor by tensor.

Example:
    .venv/bin/python benchmarks/bench_export.py                 # ~3 min on 2 shared CPU cores, 7 GB of disk
    .venv/bin/python benchmarks/bench_export.py --layers 4 --reps 1 --results ""   # a quick, smaller run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from _models import write_random_llama

HERE = Path(__file__).resolve().parent
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


# --------------------------------------------------------------------------- the inputs


def _generate(args: argparse.Namespace, base: Path, adapter: Path) -> int:
    """Write the base (bf16, one tensor at a time) and a random PEFT adapter; returns the parameter count."""
    import torch
    from safetensors.torch import save_file

    from lightning_adapt.export.safetensors_io import parse_size

    shapes = write_random_llama(
        base, args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads, args.vocab,
        parse_size(args.max_shard_size),
    ).items()  # fmt: skip
    g = torch.Generator().manual_seed(1)
    state = {}
    for key, (out_f, in_f) in ((k, s) for k, s in shapes if k.endswith(tuple(f"{t}.weight" for t in TARGETS))):
        layer = "base_model.model." + key.removesuffix(".weight")
        state[layer + ".lora_A.weight"] = torch.randn(args.r, in_f, generator=g) / in_f**0.5
        state[layer + ".lora_B.weight"] = torch.randn(out_f, args.r, generator=g) * 0.01
    adapter.mkdir()
    save_file(state, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    lora = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": args.r, "lora_alpha": 2 * args.r, "lora_dropout": 0.0,
            "target_modules": list(TARGETS), "bias": "none", "base_model_name_or_path": str(base),
            "fan_in_fan_out": False, "use_rslora": False, "use_dora": False}  # fmt: skip
    (adapter / "adapter_config.json").write_text(json.dumps(lora, indent=2))
    return sum(int(torch.Size(s).numel()) for _, s in shapes)


# --------------------------------------------------------------------------- the contenders (one process each)


def _ours(base: Path, adapter: Path, out: Path) -> dict[str, Any]:
    from lightning_adapt.export.adapter_sources import adapters_from_peft
    from lightning_adapt.export.exporter import ExportOptions
    from lightning_adapt.export.safetensors_io import model_keys, read_index
    from lightning_adapt.export.stream_export import export_streamed

    keys = model_keys(read_index(base))
    result = export_streamed(
        base, out, adapters_from_peft(adapter, keys), ExportOptions(measure_memory=True), keys=keys
    )
    assert result.memory is not None
    return {"report": result.memory.format(), "largest_fp32": result.memory.largest_fp32_bytes,
            "model_bytes": result.memory.model_bytes}  # fmt: skip


def _peft(base: Path, adapter: Path, out: Path) -> dict[str, Any]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(out)
    return {}


def _worker(args: argparse.Namespace) -> None:
    import gc

    import peft  # noqa: F401 - both contenders import the same libraries before the baseline
    import torch
    import transformers  # noqa: F401

    import lightning_adapt.export.stream_export  # noqa: F401
    from lightning_adapt.resources import current_rss_bytes, peak_rss_bytes

    torch.set_num_threads(args.threads)
    gc.collect()
    baseline = current_rss_bytes()
    Path("/proc/self/clear_refs").write_text("5")
    start = time.perf_counter()
    extra = (_ours if args.worker == "ours" else _peft)(Path(args.base), Path(args.adapter), Path(args.out))
    seconds = time.perf_counter() - start
    peak = peak_rss_bytes() - baseline
    print("RESULT " + json.dumps({"peak": peak, "seconds": seconds, "baseline": 1024 * baseline, **extra}))


def _run(name: str, args: argparse.Namespace, base: Path, adapter: Path, out: Path) -> dict[str, Any]:
    command = [sys.executable, __file__, "--worker", name, "--base", str(base), "--adapter", str(adapter),
               "--out", str(out), "--threads", str(args.threads)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if done.returncode or line is None:
        raise RuntimeError(f"{name} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return dict(json.loads(line.removeprefix("RESULT ")))


# --------------------------------------------------------------------------- comparing the outputs


def _compare(ours: Path, peft: Path) -> dict[str, Any]:
    """Tensor by tensor (one pair at a time): equal keys, dtypes and shapes; how many tensors are bit-identical
    and the largest difference."""
    import torch

    from lightning_adapt.export.safetensors_io import read_index

    a, b = read_index(ours), read_index(peft)
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
    identical, worst, worst_key = 0, 0.0, ""
    for key in a:
        x, y = a[key].read(), b[key].read()
        assert (x.dtype, x.shape) == (y.dtype, y.shape), key
        if torch.equal(x, y):
            identical += 1
            continue
        diff = float((x.float() - y.float()).abs().max())
        worst, worst_key = (diff, key) if diff > worst else (worst, worst_key)
    return {"tensors": len(a), "identical": identical, "max_abs_diff": worst, "worst": worst_key}


# --------------------------------------------------------------------------- the report


def _table(runs: dict[str, list[dict[str, Any]]], params: int, facts: dict[str, Any]) -> list[str]:
    mb = 1e6
    peak = {n: statistics.median(r["peak"] for r in rs) for n, rs in runs.items()}
    secs = {n: statistics.median(r["seconds"] for r in rs) for n, rs in runs.items()}
    largest, model = facts["largest_fp32"], facts["model_bytes"]
    rounds = len(runs["ours"])
    ratios = sorted(o["seconds"] / p["seconds"] for o, p in zip(runs["ours"], runs["peft"], strict=True))
    lines = [
        f"model: {params / 1e9:.2f}B parameters, {model / 1e9:.2f} GB in bf16; largest tensor {largest / mb:.0f} MB "
        f"in fp32; adapter r={facts['r']} on {','.join(TARGETS)}; {rounds} round(s), medians",
        "",
        "| contender | peak RSS above post-import baseline | time |",
        "|---|---|---|",
        *(f"| {n} | {peak[n] / mb:,.0f} MB | {secs[n]:.1f} s |" for n in runs),
        "",
        f"- ours/peft peak: **{peak['ours'] / peak['peft']:.3f}** (target ≤ 0.3)",
        f"- ours/peft time: **{secs['ours'] / secs['peft']:.2f}** (per round {ratios[0]:.2f}..{ratios[-1]:.2f}; "
        "target ≤ 1.0)",
        f"- ours peak / largest tensor in fp32: **{peak['ours'] / largest:.2f}** (target ≤ 3)",
        f"- ours peak / model size: {peak['ours'] / model:.3f}; peft peak / model size: {peak['peft'] / model:.2f}",
        f"- ours' own report: `{facts['report']}`",
        f"- outputs: {facts['identical']} of {facts['tensors']} tensors bit-identical to PEFT's"
        + (f"; largest difference {facts['max_abs_diff']:.3g} ({facts['worst']})" if facts["max_abs_diff"] else ""),
    ]
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--max-shard-size", default="5GB", help="of the generated base (5GB: one 2.2 GB file)")
    parser.add_argument("--reps", type=int, default=2, help="rounds; each runs both contenders once")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", default=str(HERE / "RESULTS-export.md"), help="'' to print only")
    parser.add_argument("--worker", choices=["ours", "peft"], help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--adapter", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        base, adapter = Path(tmp) / "base", Path(tmp) / "adapter"
        params = _generate(args, base, adapter)
        runs: dict[str, list[dict[str, Any]]] = {"ours": [], "peft": []}
        for i in range(args.reps):
            for name in ("ours", "peft") if i % 2 == 0 else ("peft", "ours"):
                out = Path(tmp) / f"out-{name}"
                shutil.rmtree(out, ignore_errors=True)
                runs[name].append(_run(name, args, base, adapter, out))
                print(f"round {i + 1} {name}: peak +{runs[name][-1]['peak'] / 1e6:,.0f} MB, "
                      f"{runs[name][-1]['seconds']:.1f} s", flush=True)  # fmt: skip
        facts = {**runs["ours"][-1], **_compare(Path(tmp) / "out-ours/merged", Path(tmp) / "out-peft"), "r": args.r}
        lines = _table(runs, params, facts)
    print("\n".join(lines))
    if args.results:
        header = ["# Export: streamed merge vs PEFT's merge_and_unload", "",
                  f"`{' '.join(['python benchmarks/bench_export.py', *(argv or sys.argv[1:])])}` "
                  f"({os.cpu_count()} CPU cores, torch threads {args.threads}); see the script's docstring.", ""]  # fmt: skip
        Path(args.results).write_text("\n".join([*header, *lines]) + "\n")


if __name__ == "__main__":
    main()
