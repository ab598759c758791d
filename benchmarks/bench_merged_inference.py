"""Inference benchmark: the merged export vs the base model vs the unmerged adapted model.

Claim checked: after ``W' = W + scale·B A`` is merged, the model has the base's shape, so its forward
costs the same as the base's ("zero inference overhead"); the unmerged adapted model pays for the extra
``B(A x)`` matmuls. All three models are built from one randomly initialised ``LlamaForCausalLM`` (no
download); the merged one is written by :func:`lightning_adapt.export.export_model` and read back by
``AutoModelForCausalLM.from_pretrained``. Forwards run in interleaved rounds (base, merged, adapted) on
the same token batch under ``torch.inference_mode``; medians are compared as ratios in the same run.

Example:
    .venv/bin/python benchmarks/bench_merged_inference.py                   # ~134M-param Llama, seq 256
    .venv/bin/python benchmarks/bench_merged_inference.py --layers 4 --reps 21 --targets all-linear --r 64
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from _models import llama_config

from lightning_adapt.adapters.inject import LoRASpec, inject_lora
from lightning_adapt.adapters.lora import lora_modules
from lightning_adapt.export.exporter import ExportOptions, export_model


def _build(args: argparse.Namespace, path: Path) -> Any:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = llama_config(args.hidden, args.intermediate, args.layers, args.heads, args.vocab, tied=True)
    LlamaForCausalLM(config).save_pretrained(path)
    return _load(path)


def _load(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _median_times(models: dict[str, Callable[[], Any]], reps: int, warmup: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in models}
    for i in range(warmup + reps):
        for name, run in models.items():  # interleaved: machine load hits every contender alike
            start = time.perf_counter()
            run()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--targets", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj"])
    parser.add_argument("--reps", type=int, default=11)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    targets: str | list[str] = args.targets[0] if args.targets == ["all-linear"] else args.targets
    with tempfile.TemporaryDirectory() as tmp:
        base = _build(args, Path(tmp) / "base")
        adapted = _load(Path(tmp) / "base")
        inject_lora(adapted, LoRASpec(r=args.r, alpha=2 * args.r, target_modules=targets))
        with torch.no_grad():
            for _, layer in lora_modules(adapted):
                layer.lora_B.weight.normal_(0, 0.02)
        export_model(adapted, Path(tmp) / "export", ExportOptions())
        merged = _load(Path(tmp) / "export" / "merged")
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))

    def forward(model: Any) -> Callable[[], torch.Tensor]:
        return lambda: model(input_ids=ids).logits

    with torch.inference_mode():
        diff = float((merged(input_ids=ids).logits - adapted(input_ids=ids).logits).abs().max())
        medians = _median_times(
            {"base": forward(base), "merged": forward(merged), "adapted": forward(adapted)}, args.reps, args.warmup
        )
    params = sum(p.numel() for p in base.parameters())
    print(
        f"Llama {params / 1e6:.1f}M params, LoRA r={args.r} on {targets} ({len(lora_modules(adapted))} layers), "
        f"batch {args.batch} x seq {args.seq}, {torch.get_num_threads()} threads, median of {args.reps}"
    )
    for name, seconds in medians.items():
        print(f"  {name:<8} {1e3 * seconds:8.2f} ms")
    print(f"  merged / base    = {medians['merged'] / medians['base']:.3f}  (1.0 = no inference overhead)")
    print(f"  adapted / base   = {medians['adapted'] / medians['base']:.3f}  (unmerged LoRA overhead)")
    print(f"  adapted / merged = {medians['adapted'] / medians['merged']:.3f}")
    print(f"  max |logits(merged) - logits(adapted)| = {diff:.2e}")


if __name__ == "__main__":
    main()
