"""QLoRA benchmark: lightning-adapt (``quantize_model`` nf4+dq, then ``inject_lora``) vs the PEFT +
bitsandbytes reference, same model, batch and targets, one run, interleaved as in ``bench_lora.py``.

Contenders (each in its own worker process, from the same seed-``--seed`` random fp32 Llama):

- ``ours``: the package's flow: the fp32 model is quantized in place by
  ``quantize_model(model, QuantConfig("nf4", double_quant=True, compute_dtype=bf16))``, then
  ``inject_lora``. Unquantized parameters (embeddings, norms, ``lm_head``) stay fp32.
- ``ours-bf16``: the same, after ``model.to(bfloat16)`` (what the reference does to the unquantized
  parameters, and the dtype it quantizes from).
- ``peft``: the reference, as a PEFT user writes it: the fp32 model is saved with ``save_pretrained``,
  reloaded by ``AutoModelForCausalLM.from_pretrained(dir, quantization_config=BitsAndBytesConfig(
  load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
  bnb_4bit_compute_dtype=bf16), dtype=bf16, device_map=<device>)``, then
  ``get_peft_model(model, LoraConfig(...))`` (adapters fp32: PEFT's ``autocast_adapter_dtype``).
  ``prepare_model_for_kbit_training`` is not called (it would add gradient checkpointing and fp32
  casts that ours does not do).

``--compute fp32`` replaces bf16 by fp32 everywhere above (model dtype of ``peft``, 4-bit compute dtype of
both sides); ``ours-bf16`` is then ``ours`` and is dropped.

Measured: median step time (forward + backward + AdamW step), parameter memory (all parameters and
buffers + 4-bit quant state: absmax, nested absmax, code tables, offset), trainable parameters,
optimizer state, and the setup peak of ``quantize_model``: peak RSS (CUDA: allocated memory) during
the call above the level just before it, as a fraction of the model's size before quantization.

Example:
    .venv/bin/python benchmarks/bench_qlora.py                 # same defaults as bench_lora.py
    .venv/bin/python benchmarks/bench_qlora.py --compute fp32  # fp32 compute (and fp32 model) on both sides
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lora import (
    DTYPES,
    Builder,
    Result,
    Settings,
    build_llama,
    current_rss,
    describe,
    frozen_floor,
    mb,
    parse_settings,
    peak_bytes,
    peft_targets,
    ratio_line,
    reset_peak,
    run_interleaved,
    select,
    table,
    tensor_bytes,
)


def compute_dtype(s: Settings) -> torch.dtype:
    """The 4-bit layers' compute dtype of this run (``--compute``; both sides use the same)."""
    return DTYPES[s.extra.get("compute", "bf16")]


def quant_state_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The tensors of a 4-bit weight's quant state (independent of lightning_adapt's own counting)."""
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    if state is None:
        return []
    tensors = [state.absmax, state.code]
    if getattr(state, "nested", False):
        tensors += [state.offset, state.state2.absmax, state.state2.code]
    return [t for t in tensors if isinstance(t, torch.Tensor)]


def parameter_memory(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (packed 4-bit codes as stored) plus the 4-bit quant states."""
    states = [t for m in model.modules() for t in quant_state_tensors(m)]
    return tensor_bytes(model.parameters()) + tensor_bytes(model.buffers()) + tensor_bytes(states)


def _quantize_ours(model: nn.Module, s: Settings) -> dict[str, float]:
    from lightning_adapt.quantize import QuantConfig, quantize_model

    device = s.device
    model.to(device)
    size = tensor_bytes(model.parameters())
    before = current_rss() if device.type == "cpu" else torch.cuda.memory_allocated(device)
    reset_peak(device)
    quantize_model(model, QuantConfig(mode="nf4", double_quant=True, compute_dtype=compute_dtype(s)))
    extra = peak_bytes(device) - before
    return {"quant_peak_extra": extra, "quant_model_bytes": size}


def _inject_ours(model: nn.Module, s: Settings) -> None:
    from lightning_adapt.adapters.inject import LoRASpec, inject_lora

    inject_lora(model, LoRASpec(r=s.r, alpha=s.alpha, dropout=0.0, target_modules=peft_targets(s)))


def ours_qlora(s: Settings) -> tuple[nn.Module, dict[str, float]]:
    model = build_llama(s, torch.float32)
    info = _quantize_ours(model, s)
    _inject_ours(model, s)
    return model, {**info, "param_memory": parameter_memory(model)}


def ours_qlora_bf16(s: Settings) -> tuple[nn.Module, dict[str, float]]:
    model = build_llama(s, torch.float32).to(compute_dtype(s))
    info = _quantize_ours(model, s)
    _inject_ours(model, s)
    return model, {**info, "param_memory": parameter_memory(model)}


def floor_qlora(s: Settings) -> tuple[nn.Module, dict[str, float]]:
    """Our 4-bit base (quantized as ``ours``, model dtype as ``ours-bf16`` when the compute is bf16) without
    adapters, frozen, every input gradient computed (``bench_lora.frozen_floor``): the bound of any QLoRA step."""
    model = build_llama(s, torch.float32)
    model = model.to(compute_dtype(s)) if compute_dtype(s) != torch.float32 else model
    info = _quantize_ours(model, s)
    return frozen_floor(model), {**info, "param_memory": parameter_memory(model)}


def peft_qlora(s: Settings) -> tuple[nn.Module, dict[str, float]]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = compute_dtype(s)
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )
    with tempfile.TemporaryDirectory() as tmp:
        build_llama(s, torch.float32).save_pretrained(tmp)
        model = AutoModelForCausalLM.from_pretrained(
            tmp, quantization_config=quant, dtype=dtype, device_map=str(s.device)
        )
    model.config.use_cache = False
    config = LoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=0.0, target_modules=peft_targets(s), bias="none")
    model = get_peft_model(model, config)
    return model, {"param_memory": parameter_memory(model)}


def report(results: dict[str, Result]) -> None:
    print(table(results))
    for name, r in results.items():
        line = f"{name:<10} parameter memory {mb(r.info['param_memory'])}"
        if "quant_peak_extra" in r.info:
            frac = r.info["quant_peak_extra"] / r.info["quant_model_bytes"]
            line += (
                f"; quantize_model setup peak +{mb(r.info['quant_peak_extra'])} over the "
                f"{mb(r.info['quant_model_bytes'])} model = {frac:.3f}x its size"
            )
        print(line)
    same_settings = "ours-bf16" if "ours-bf16" in results else "ours"  # the contender set up as the reference is
    for num in ("ours", "ours-bf16"):
        if num in results and "peft" in results:
            print(ratio_line(results, num, "peft", target=0.95 if num == same_settings else None))
            memory = results[num].info["param_memory"] / results["peft"].info["param_memory"]
            print(f"{num}/peft: parameter memory {memory:.3f} (target <= 1.0)")
    if "ours" in results and "ours-bf16" in results:
        print(ratio_line(results, "ours", "ours-bf16", target=None))


def settings(argv: Sequence[str] | None) -> tuple[Settings, argparse.Namespace]:
    """The shared settings plus ``--compute {bf16,fp32}`` (the 4-bit compute dtype, and the model dtype
    of ``ours-bf16`` and ``peft``)."""
    s, args = parse_settings(argv, __doc__.splitlines()[0] if __doc__ else "")
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--compute", choices=["bf16", "fp32"], default="bf16")
    compute = extra.parse_known_args(argv)[0].compute
    return dataclasses.replace(s, dtype=compute, extra={"preload": ("bitsandbytes",), "compute": compute}), args


def contenders_for(s: Settings) -> dict[str, Builder]:
    """``ours``, ``ours-bf16`` (only when computing in bf16: with fp32 compute it is ``ours``), ``peft`` and
    ``floor`` (the frozen 4-bit base without adapters: the bound)."""
    contenders: dict[str, Builder] = {
        "ours": ours_qlora, "ours-bf16": ours_qlora_bf16, "peft": peft_qlora, "floor": floor_qlora,
    }  # fmt: skip
    if compute_dtype(s) == torch.float32:
        del contenders["ours-bf16"]
    return contenders


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Measure once; ``{"describe": str, "results": {name: Result}}`` (what ``run_all.py`` reads)."""
    s, args = settings(argv)
    described = describe(s) + f"; quantized nf4+dq, compute {compute_dtype(s)}"
    print(described)
    results = run_interleaved(select(contenders_for(s), args.only), s, args.warmup, args.reps)
    return {"describe": described, "results": results}


def main(argv: Sequence[str] | None = None) -> None:
    report(run(argv)["results"])


if __name__ == "__main__":
    main()
