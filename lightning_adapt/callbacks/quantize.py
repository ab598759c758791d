"""``QuantizeBaseCallback``: store the frozen base's Linear weights in 4-bit (NF4/FP4) or int8."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_adapt.adapters.checkpoint import install_adapter_only_state
from lightning_adapt.adapters.init import before_quantize
from lightning_adapt.adapters.inject import LoRASpec
from lightning_adapt.callbacks._fsdp1 import fsdp1_param_dtype, fsdp1_quant_storage
from lightning_adapt.callbacks._transform import QUANTIZE, ModelTransformCallback, transform_specs
from lightning_adapt.export.original import spill_originals, spill_target
from lightning_adapt.layers import require_bitsandbytes, to_dtype
from lightning_adapt.loading import attach_quant_plan
from lightning_adapt.quantize import (
    QuantConfig,
    QuantMode,
    QuantPlan,
    QuantSummary,
    quantization_roundtrip,
    quantize_model,
)

DTypeName = Literal["bf16", "fp16", "fp32", "bfloat16", "float16", "float32"]
StorageName = Literal["uint8", "bf16", "fp16", "fp32", "bfloat16", "float16", "float32"]


class QuantizeBaseCallback(ModelTransformCallback):
    """Quantize the frozen base of any LightningModule, layer by layer, right after ``configure_model``.

    Runs before LoRA injection whatever order the callbacks are listed in, so adapters are never
    quantized; quantizing an already quantized model is a no-op. With ``lora: init: pissa/olora/loftq`` each
    adapted layer's init is computed from its full-precision weight first, and the changed base is quantized. Output heads, tied weights, embeddings
    and norms stay in full precision. Checkpoints hold only the trainable part (a full 4-bit state dict
    cannot be reloaded through bitsandbytes). At fit start it prints the measured size of the base.
    """

    def __init__(
        self,
        mode: QuantMode = "nf4",
        double_quant: bool | None = None,
        blocksize: int = 64,
        compute_dtype: DTypeName | torch.dtype | None = None,
        quant_storage: StorageName | torch.dtype = "uint8",
        skip_modules: list[str] | None = None,
        include_default_skips: bool = True,
    ) -> None:
        """
        Args:
            mode: ``nf4`` (QLoRA's 4-bit NormalFloat), ``fp4``, or ``int8`` (LLM.int8).
            double_quant: quantize the 4-bit block constants to 8 bits (≈4.127 instead of 4.5 bits per
                weight). Default: on for nf4/fp4, off (and not allowed) for int8.
            blocksize: 4-bit only: weights per absmax constant (64 in QLoRA).
            compute_dtype: dtype the dequantized matmul runs in (``bf16``/``bfloat16``, ``fp16``, ``fp32``, or a
                ``torch.dtype``). ``None`` (default): bf16 on CUDA (as QLoRA), else the dtype the weights are in
                (the run's precision): fp32 stays fast on a CPU without bf16 matmul units. An explicit value wins.
            quant_storage: 4-bit only: dtype of the packed weight tensor (non-uint8 is for sharded training).
            skip_modules: extra modules to keep in full precision (dotted names or suffixes, e.g. ``[gate]``).
            include_default_skips: keep output heads (lm_head, classifier, score, ...) and tied weights in
                full precision.
        """
        super().__init__()
        require_bitsandbytes()
        if double_quant is None:
            double_quant = mode != "int8"
        self.config = QuantConfig(
            mode=mode,
            double_quant=double_quant,
            blocksize=blocksize,
            compute_dtype=None if compute_dtype is None else to_dtype(compute_dtype, "compute_dtype"),
            quant_storage=to_dtype(quant_storage, "quant_storage", ("uint8", "bf16", "fp16", "fp32")),
        )
        self.keep: tuple[str, ...] = ()  # LoRA's modules_to_save, set in setup: they train, so stay full precision
        self.skip_modules = list(skip_modules or [])
        self.include_default_skips = include_default_skips
        self.summary: QuantSummary | None = None
        self.kept: list[str] = []

    name = "quantize"
    priority = QUANTIZE

    @property
    @override
    def spec(self) -> QuantPlan:
        return QuantPlan(self.config, tuple(self.skip_modules), self.include_default_skips, self.keep)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if isinstance(trainer.strategy, FSDPStrategy):  # FSDP1 flattens the codes with the other weights
            param_dtype = fsdp1_param_dtype(trainer.strategy, str(trainer.precision))
            storage = fsdp1_quant_storage(self.config.mode, self.config.quant_storage, param_dtype)
            if storage != self.config.quant_storage:
                rank_zero_info(f"lightning-adapt: FSDP1: 4-bit codes stored as {storage} (the compute dtype)")
            self.config = replace(self.config, quant_storage=storage)
        specs = [spec for spec in transform_specs(trainer) if isinstance(spec, LoRASpec)]
        self.keep = tuple(entry for spec in specs for entry in spec.modules_to_save)
        super().setup(trainer, pl_module, stage)

    @override
    def before_configure_model(self, module: nn.Module) -> None:
        # a module that loads through lightning_adapt.loading quantizes each weight as it arrives
        attach_quant_plan(module, self.spec)

    @override
    def after_teardown(self, module: nn.Module) -> None:
        attach_quant_plan(module, None)

    @override
    def apply(self, module: nn.Module) -> QuantSummary:
        """Quantize ``module`` in place (idempotent) and make its checkpoints adapter-only."""
        plan = self.spec
        target = spill_target(module)  # MergeOnSaveCallback merges into the originals: keep them, on disk
        if target is not None:
            written = spill_originals(module, plan.selected(module), target)
            if written:
                rank_zero_info(
                    f"lightning-adapt: wrote the full-precision weights of the layers about to be quantized to "
                    f"{target} ({written / 1e6:.1f} MB): the export merges into them (merge_base='original')"
                )
        self.kept = plan.kept(module)
        finish = _prepare_bases(module, plan)
        self.summary = quantize_model(module, plan.config, plan.skip_modules, plan.include_default_skips, plan.keep)
        for name, done in finish.items():  # on the quantized layer that replaced the float one
            done(module.get_submodule(name))
        install_adapter_only_state(module)
        return self.summary

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self.summary is not None:
            kept = f"; kept in full precision for modules_to_save: {', '.join(self.kept)}" if self.kept else ""
            rank_zero_info(f"lightning-adapt: {self.summary.format()}{kept}")


def _prepare_bases(module: nn.Module, plan: QuantPlan) -> dict[str, Callable[[nn.Module], None]]:
    """Run the :func:`~lightning_adapt.adapters.init.before_quantize` hook (LoRA's PiSSA / OLoRA / LoftQ init) on each layer
    it targets that ``plan`` quantizes, one at a time, from its full-precision weight; returns what to finish on
    each quantized replacement, by name."""
    hook, selected = before_quantize(module), set(plan.selected(module))
    if hook is None or not selected:  # nothing left to quantize: a repeated configure_model
        return {}
    finish: dict[str, Callable[[nn.Module], None]] = {}
    for name in sorted(hook.targets(module) & selected):
        layer = module.get_submodule(name)
        dtype = next(iter(layer.parameters())).dtype
        finish[name] = hook(layer, quantization_roundtrip(plan.config, dtype))
    return finish
