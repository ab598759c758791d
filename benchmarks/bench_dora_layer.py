"""One adapted layer, forward + backward: what DoRA costs on top of LoRA, ours vs PEFT, in one process.

The whole-model benchmark (``bench_lora.py --dora``) shows the DoRA ratio diluted by everything DoRA does not
touch (attention, MLP, the 32k-vocabulary head); this isolates the DoRA part. Four modules wrap copies of the
same ``nn.Linear(--hidden, --hidden)`` (r, alpha as in bench_lora): ours and PEFT's LoRA, ours and PEFT's DoRA
(same A, B and magnitude). Each rep times forward + backward of a ``(1, --seq, --hidden)`` input on each module
in rotating order; ratios are medians of per-rep ratios (min..max in brackets). ``DoRA extra`` = DoRA time minus
the same side's LoRA time, from the same rep.

Example:
    .venv/bin/python benchmarks/bench_dora_layer.py --reps 200
    .venv/bin/python benchmarks/bench_dora_layer.py --dropout 0.05
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def modules(hidden: int, r: int, alpha: float, dropout: float) -> dict[str, nn.Module]:
    from peft import LoraConfig, get_peft_model

    from lightning_adapt.adapters.lora import LoRALinear

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(hidden, hidden))
    built: dict[str, nn.Module] = {}
    for dora in (False, True):
        ours = LoRALinear(copy.deepcopy(base[0]), r=r, alpha=alpha, dropout=dropout, use_dora=dora)
        nn.init.normal_(ours.lora_B.weight, std=0.02)
        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=["0"], use_dora=dora)
        theirs = get_peft_model(copy.deepcopy(base), config).base_model.model[0]
        with torch.no_grad():
            theirs.lora_A["default"].weight.copy_(ours.lora_A.weight)
            theirs.lora_B["default"].weight.copy_(ours.lora_B.weight)
        suffix = "-dora" if dora else ""
        built["ours" + suffix], built["peft" + suffix] = ours.train(), theirs.train()
    return built


def step(module: nn.Module, x: torch.Tensor) -> float:
    x = x.detach().requires_grad_()
    start = time.perf_counter()
    module(x).sum().backward()
    return time.perf_counter() - start


def paired(a: Sequence[float], b: Sequence[float]) -> str:
    ratios = [p / q for p, q in zip(a, b, strict=True)]
    return f"{statistics.median(ratios):.3f} ({min(ratios):.3f}..{max(ratios):.3f})"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    for name, default in (("hidden", 768), ("seq", 256), ("r", 16), ("reps", 100), ("warmup", 5), ("threads", 1)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--dropout", type=float, default=0.0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    built = modules(args.hidden, args.r, args.alpha, args.dropout)
    x = torch.randn(1, args.seq, args.hidden)
    times: dict[str, list[float]] = {name: [] for name in built}
    names = list(built)
    for rep in range(args.warmup + args.reps):
        for name in names[rep % 4 :] + names[: rep % 4]:
            elapsed = step(built[name], x)
            if rep >= args.warmup:
                times[name].append(elapsed)
    print(
        f"Linear({args.hidden}, {args.hidden}), input (1, {args.seq}, {args.hidden}), r={args.r}, dropout={args.dropout}, "
        f"{args.reps} reps, {args.threads} thread(s); torch {torch.__version__}"
    )
    for name, values in times.items():
        print(f"  {name:<10} median {1e3 * statistics.median(values):.3f} ms")
    print(f"  DoRA layer, ours / peft: {paired(times['ours-dora'], times['peft-dora'])}")
    print(f"  LoRA layer, ours / peft: {paired(times['ours'], times['peft'])}")
    ours_extra, peft_extra = (
        [d - lo for d, lo in zip(times[f"{side}-dora"], times[side], strict=True)] for side in ("ours", "peft")
    )
    print(
        f"  DoRA extra over LoRA: ours {1e3 * statistics.median(ours_extra):.3f} ms, "
        f"peft {1e3 * statistics.median(peft_extra):.3f} ms; DoRA / LoRA: ours {paired(times['ours-dora'], times['ours'])}, "
        f"peft {paired(times['peft-dora'], times['peft'])}"
    )


if __name__ == "__main__":
    main()
