"""The quantization error per layer before and after each initialisation, on the chat recipes' model.

For every weight ``W`` the chat QLoRA recipes adapt (SmolLM2-135M-Instruct: q, k, v, o of 30 layers; r=16,
alpha=32, NF4 with double quantization, as ``recipes/chat/qlora*.yaml``) this computes, with the library's own
functions (``lightning_adapt.adapters.init``, ``quantize.quantization_roundtrip``), the error of the model the
training starts from::

    plain NF4   ‖W − deq(quant(W))‖²
    init        ‖W − deq(quant(base)) − s·B0·A0‖²      base, A0, B0 from PiSSA / LoftQ (1, 2 and 4 iterations)

and writes ``docs/figures/inits/quant_error.{md,json}``: per layer (the four projections summed), per projection
kind and in total, with each init's change against plain NF4. It explains the inits table of the README: the
starting perplexity follows the error the base keeps.

Example:
    .venv/bin/python benchmarks/bench_init_error.py            # ~2 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open

from lightning_adapt.adapters.init import loftq, pissa
from lightning_adapt.models import resolve_model
from lightning_adapt.quantize import QuantConfig, quantization_roundtrip

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "figures" / "inits"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
INITS = ("pissa", "loftq-1", "loftq-2", "loftq-4")


def errors(weight: torch.Tensor, r: int, scaling: float) -> dict[str, float]:
    """``{"nf4": ‖W − deq(quant(W))‖², init: ‖W − deq(quant(base)) − s·B0·A0‖²}`` for one weight."""
    roundtrip = quantization_roundtrip(QuantConfig(mode="nf4", double_quant=True), torch.float32)
    w = weight.float()
    out = {"nf4": float((w - roundtrip(w)).pow(2).sum())}
    inits = {"pissa": pissa(w, r, scaling)}
    inits |= {f"loftq-{n}": loftq(w, r, scaling, roundtrip, iterations=n) for n in (1, 2, 4)}
    for name, init in inits.items():
        start = roundtrip(init.base) + scaling * (init.lora_B @ init.lora_A)
        out[name] = float((w - start).pow(2).sum())
    return out


def measure(model: str, r: int, alpha: float) -> dict[str, dict[str, float]]:
    """Per weight name (``layers.<i>.<proj>``) its :func:`errors`, and its squared norm as ``"weight"``."""
    path = resolve_model(model)
    rows: dict[str, dict[str, float]] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in sorted(f.keys()):
                parts = key.split(".")
                if len(parts) < 5 or parts[-2] not in PROJECTIONS or parts[-1] != "weight":
                    continue
                weight = f.get_tensor(key)
                name = f"layers.{int(parts[-4]):02d}.{parts[-2]}"
                rows[name] = {"weight": float(weight.float().pow(2).sum()), **errors(weight, r, alpha / r)}
    return rows


def _change(value: float, plain: float) -> str:
    return f"{value:.2f} ({100 * (value / plain - 1):+.0f}%)"


def _row(label: str, sums: dict[str, float]) -> str:
    cells = [_change(sums[i], sums["nf4"]) for i in INITS]
    return f"| {label} | {100 * sums['nf4'] / sums['weight']:.3f}% | {sums['nf4']:.2f} | " + " | ".join(cells) + " |"


def render(rows: dict[str, dict[str, float]], seconds: float) -> str:
    """The Markdown page: totals, per projection kind, per layer."""
    groups: dict[str, dict[str, dict[str, float]]] = {"kind": defaultdict(lambda: defaultdict(float))}
    groups["layer"] = defaultdict(lambda: defaultdict(float))
    total: dict[str, float] = defaultdict(float)
    for name, row in rows.items():
        _, layer, proj = name.split(".")
        for column, value in row.items():
            groups["kind"][proj][column] += value
            groups["layer"][layer][column] += value
            total[column] += value
    header = "| weights | plain NF4 error / ‖W‖² | plain NF4 | " + " | ".join(INITS) + " |\n"
    header += "|---" * (3 + len(INITS)) + "|\n"
    lines = [
        "# Quantization error per layer, before and after each initialisation",
        "",
        "Written by `benchmarks/bench_init_error.py` (do not edit by hand; "
        f"{len(rows)} weights, {seconds:.0f} s on this machine). SmolLM2-135M-Instruct, the weights the chat QLoRA "
        "recipes adapt (q, k, v, o of 30 layers), r=16, alpha=32, NF4 with double quantization. Each cell is "
        "Σ‖W − deq(quant(base)) − s·B0·A0‖² (plain NF4: Σ‖W − deq(quant(W))‖²) and its change against plain NF4. "
        "The adapter holds rank 16 of each weight in fp32; the NF4 error of the rest stays in the starting model.",
        "",
        "## In total",
        "",
        header + _row("all", total),
        "",
        "## Per projection kind",
        "",
        header + "\n".join(_row(kind, groups["kind"][kind]) for kind in PROJECTIONS),
        "",
        "## Per layer (its four projections)",
        "",
        header + "\n".join(_row(layer, groups["layer"][layer]) for layer in sorted(groups["layer"])),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    start = time.perf_counter()
    rows = measure(args.model, args.r, args.alpha)
    seconds = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quant_error.json").write_text(json.dumps(rows, indent=1, sort_keys=True) + "\n")
    (args.out / "quant_error.md").write_text(render(rows, seconds))
    print(render(rows, seconds).split("## Per projection kind")[0])


if __name__ == "__main__":
    main()
