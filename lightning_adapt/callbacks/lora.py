"""``LoRAInjectionCallback``: add LoRA adapters to any LightningModule by configuration."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from safetensors import SafetensorError
from torch import nn
from typing_extensions import override

from lightning_adapt.adapters.checkpoint import install_adapter_only_state
from lightning_adapt.adapters.compiled import compile_adapted
from lightning_adapt.adapters.init import CHANGED_BASE_INITS, attach_before_quantize, dora_problem
from lightning_adapt.adapters.inject import LoRASpec, inject_lora, lora_plus_params, trainable_table
from lightning_adapt.adapters.lora import validate_lora_args
from lightning_adapt.adapters.prepare import changed_base_hook
from lightning_adapt.callbacks._transform import INJECT_LORA, ModelTransformCallback, transform_specs
from lightning_adapt.errors import ConfigError, setting_names
from lightning_adapt.export.peft_format import load_adapter_weights, read_adapter, resolve_adapter_settings
from lightning_adapt.layers import adapter_param_ids, output_head_names
from lightning_adapt.optim import extend_scheduler, split_lora_plus
from lightning_adapt.quantize import QuantPlan

_IMPORTED = "_lightning_adapt_imported_adapter"
_ARGUMENT = "lora.adapter_path"


def _read_adapter(path: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """:func:`read_adapter` with one :class:`ConfigError` for pickled weights (never loaded: unpickling can run
    code) and for a damaged ``adapter_config.json`` or ``adapter_model.safetensors``."""
    folder = Path(path)
    if (folder / "adapter_model.bin").is_file() and not (folder / "adapter_model.safetensors").is_file():
        raise ConfigError(
            f"{_ARGUMENT}={path!r} holds adapter_model.bin, a pickle, which is never loaded (unpickling can run "
            "code); only adapter_model.safetensors is read. Fix: save the adapter with safe_serialization=True."
        )
    try:
        with setting_names(adapter_path=_ARGUMENT):
            return read_adapter(path)
    except (OSError, ValueError, SafetensorError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(
            f"{_ARGUMENT}={path!r}: the adapter files cannot be read ({err}). "
            "Fix: write the adapter again (PeftModel.save_pretrained or lightning-adapt export)."
        ) from None


_MODES: dict[str, tuple[str, ...]] = {"compile": ("off", "blocks", "model")}


def _check_modes(loftq_iterations: object, lora_plus_ratio: object, dora: str | None, **values: object) -> None:
    """One :class:`ConfigError` naming every mode argument outside its allowed values, the LoftQ / LoRA+ numbers and
    an ``init`` DoRA cannot take (``dora``: :func:`~lightning_adapt.adapters.init.dora_problem`)."""
    problems = [f"lora.{dora}"] if dora else []
    problems += [
        f"lora.{name}={value!r}: must be one of {_MODES[name]}. Fix: {name}={_MODES[name][0]!r}."
        for name, value in values.items()
        if value not in _MODES[name]
    ]
    if isinstance(loftq_iterations, bool) or not isinstance(loftq_iterations, int) or loftq_iterations < 1:
        problems.append(
            f"lora.loftq_iterations={loftq_iterations!r}: must be an int >= 1 (quantize / SVD alternations of "
            "init: loftq). Fix: loftq_iterations=1 (5 for a closer fit, 5x the init time)."
        )
    ratio_ok = isinstance(lora_plus_ratio, int | float) and not isinstance(lora_plus_ratio, bool)
    if lora_plus_ratio is not None and not (ratio_ok and lora_plus_ratio > 0):  # type: ignore[operator]
        problems.append(
            f"lora.lora_plus_ratio={lora_plus_ratio!r}: must be a number > 0 (LoRA+: B's learning rate over A's) or "
            "null (one learning rate). Fix: lora_plus_ratio=16 (the LoRA+ paper's choice for LLMs), or null."
        )
    if problems:
        raise ConfigError("Invalid LoRAInjectionCallback arguments:\n  - " + "\n  - ".join(problems))


class LoRAInjectionCallback(ModelTransformCallback):
    """Freeze the base and wrap the targeted layers with ``W x + (alpha/r)·B A dropout(x)``.

    ``A`` starts random and ``B`` at zero, so the model is unchanged at step 0. Injection happens right
    after ``configure_model`` (so modules that build their network there work too) and before the
    optimizer is configured and any checkpoint is restored; it is idempotent across repeated
    ``fit``/``validate``/``test``/``predict`` calls. Checkpoints hold only the trainable weights plus a
    fingerprint of the base, and refuse to resume on another base. At fit start it prints a table of
    adapted layers and trainable parameters.

    Example::

        Trainer(callbacks=[LoRAInjectionCallback(r=16, alpha=32, target_modules=["q_proj", "v_proj"])])
    """

    def __init__(
        self,
        r: int | None = None,
        alpha: float | None = None,
        dropout: float = 0.05,
        target_modules: str | list[str] | None = None,
        exclude_modules: list[str] | None = None,
        modules_to_save: list[str] | None = None,
        init: Literal["kaiming", "gaussian", "pissa", "olora", "loftq"] = "kaiming",
        use_rslora: bool | None = None,
        use_dora: bool | None = None,
        adapter_only_checkpoint: bool = True,
        adapter_path: str | None = None,
        compile: Literal["off", "blocks", "model"] = "off",
        target_parameters: list[str] | None = None,
        loftq_iterations: int = 1,
        lora_plus_ratio: float | None = None,
    ) -> None:
        """
        Args:
            r: rank of the update ``B A`` (8-16 for classification, 32-64 for generation). Default 8,
                or the adapter's with ``adapter_path`` (as for ``alpha``, ``target_modules``,
                ``modules_to_save``, ``use_rslora``, ``use_dora``: a value given here must agree with it).
            alpha: scale numerator: the update is scaled by ``alpha / r`` (commonly ``alpha = 2 r``); default 16.
            dropout: dropout on the adapter input, in [0, 1).
            target_modules: layers to adapt: names (exact or dotted suffix, e.g. ``[q_proj, v_proj]``),
                full-match regexes, or ``all-linear`` (every linear layer except output heads).
                ``None``: the query and value projections under their common names.
            exclude_modules: layers to leave out of ``target_modules`` (same rules).
            modules_to_save: modules trained fully and saved with the adapter (e.g. a new ``classifier``).
            init: ``kaiming`` (``A`` uniform, as PEFT) or ``gaussian`` (std ``1/r``), with ``B = 0``: the model is
                unchanged at step 0. Or ``A``, ``B`` from each adapted linear layer's weight ``W``, the frozen base
                becoming the rest: ``pissa`` (top-``r`` singular vectors; base ``W - scale·B A``), ``olora`` (QR),
                ``loftq`` (with ``quantize:`` only: alternates the 4-bit quantization of the base with a rank-``r``
                SVD of its error, so that ``Q + scale·B A`` is closer to ``W`` than ``Q`` alone). With ``quantize:`` the
                changed base is what gets quantized, computed one layer at a time in fp32 before it is.
            use_rslora: scale by ``alpha / sqrt(r)`` (rank-stabilised LoRA); default off.
            use_dora: weight-decomposed LoRA (DoRA): a learned magnitude per output times the normalised
                direction ``W + scale B A``; default off.
            adapter_only_checkpoint: save only trainable weights (and optimizer/loop state) in ``.ckpt``.
            adapter_path: start from this PEFT-format LoRA adapter directory (``adapter_config.json`` +
                ``adapter_model.safetensors``, e.g. from ``PeftModel.save_pretrained`` or ``MergeOnSaveCallback``):
                its weights are loaded once, right after injection, to continue training or evaluate it.
            compile: ``torch.compile`` the adapted model after injection (lazily, at the first step), in
                place, so module names and checkpoints are unchanged. ``blocks``: each transformer block that
                holds adapters (compiled once, reused by every identical block: seconds, not minutes);
                ``model``: the whole model's forward, loss included (more fusion, much longer compile);
                ``off``: eager.
            target_parameters: parameters read outside a Linear's forward to adapt as ``W + (alpha/r)·B A``
                (same naming rules as ``target_modules``), e.g. the fused MoE experts of transformers 5:
                ``[experts.gate_up_proj, experts.down_proj]``; a 3-D ``(experts, out, in)`` parameter gets one
                rank-``r`` pair per expert. Dropout does not apply to them, and with ``quantize:`` they stay in
                full precision (bitsandbytes quantizes 2-D linear layers only). With it, ``target_modules: []``
                adapts parameters only.
            loftq_iterations: ``init: loftq``: quantize / SVD alternations per layer (1 is PEFT's default).
            lora_plus_ratio: LoRA+: train every ``B`` with this many times the learning rate of its ``A`` (the
                optimizer you configure, or ``paged_optimizer:``'s, gets one more param group per group holding
                ``B`` factors, LR schedulers included); ``null``: one learning rate. The LoRA+ paper uses 16.
        """
        super().__init__()
        adapter_config: dict[str, Any] | None = None
        self._adapter_weights: dict[str, torch.Tensor] | None = None
        if adapter_path and init in CHANGED_BASE_INITS:
            raise ConfigError(
                f"lora.init={init!r} with lora.adapter_path: the adapter was trained on the original base, which "
                f"{init} would change. Fix: drop lora.init (its weights replace the init anyway), or adapter_path."
            )
        if adapter_path:
            adapter_config, self._adapter_weights = _read_adapter(adapter_path)
        explicit: dict[str, object] = {"r": r, "alpha": alpha, "target_modules": target_modules}
        explicit |= {"use_rslora": use_rslora, "use_dora": use_dora, "modules_to_save": modules_to_save}
        with setting_names(adapter_path=_ARGUMENT):
            settings = resolve_adapter_settings(explicit, adapter_config)
        validate_lora_args(settings["r"], settings["alpha"], dropout, init)
        _check_modes(loftq_iterations, lora_plus_ratio, dora_problem(init, settings["use_dora"]), compile=compile)
        self._spec = LoRASpec(
            r=settings["r"],
            alpha=settings["alpha"],
            dropout=dropout,
            target_modules=settings["target_modules"],
            exclude_modules=tuple(exclude_modules or ()),
            modules_to_save=tuple(settings["modules_to_save"] or ()),
            init=init,
            use_rslora=settings["use_rslora"],
            use_dora=settings["use_dora"],
            target_parameters=tuple(target_parameters or ()),
            loftq_iterations=loftq_iterations,
            lora_plus_ratio=None if lora_plus_ratio is None else float(lora_plus_ratio),
        )
        self.adapter_path = adapter_path
        self.adapter_only_checkpoint = adapter_only_checkpoint
        self.compile_scope = compile
        self.adapted: list[str] = []

    name = "lora"
    priority = INJECT_LORA

    @property
    @override
    def spec(self) -> LoRASpec:
        return self._spec

    @override
    def before_configure_model(self, module: nn.Module) -> None:
        # PiSSA / OLoRA / LoftQ: whatever quantizes the base (load_pretrained, QuantizeBaseCallback) changes it first
        attach_before_quantize(module, changed_base_hook(self.spec))

    @override
    def after_teardown(self, module: nn.Module) -> None:
        attach_before_quantize(module, None)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        _check_changed_base(self.spec, trainer)
        super().setup(trainer, pl_module, stage)

    @override
    def apply(self, module: nn.Module) -> list[str]:
        """Inject adapters into ``module`` (idempotent); returns the adapted layer names."""
        heads = _trainable_new_heads(module)
        self.adapted = inject_lora(module, self.spec)
        frozen = [name for name in heads if not any(p.requires_grad for p in module.get_submodule(name).parameters())]
        if frozen:
            rank_zero_warn(
                f"lightning-adapt: LoRA froze {', '.join(frozen)}, an output head that was trainable. If it is new "
                f"or must learn your task, train it fully: modules_to_save={frozen!r} (recipes: lora: modules_to_save)."
            )
        if self._adapter_weights is not None and module.__dict__.get(_IMPORTED) != self.adapter_path:
            # once per module: a later configure_model (validate after fit) must keep the trained weights
            with setting_names(adapter_path=_ARGUMENT):
                load_adapter_weights(module, self._adapter_weights)
            module.__dict__[_IMPORTED] = self.adapter_path
        if self.adapter_only_checkpoint:
            install_adapter_only_state(module)
        if self.compile_scope != "off":
            compile_adapted(module, self.compile_scope)
        return self.adapted

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        spec = self.spec
        if spec.lora_plus_ratio is not None:  # after configure_optimizers, before any optimizer state is restored
            _lora_plus(trainer, pl_module, spec.lora_plus_ratio)
        rank_zero_info(
            f"lightning-adapt: LoRA r={spec.r} alpha={spec.alpha:g} dropout={spec.dropout:g}"
            f"{' rslora' if spec.use_rslora else ''}{' dora' if spec.use_dora else ''} "
            f"on {len(self.adapted)} layers\n{trainable_table(pl_module)}"
        )


def _lora_plus(trainer: L.Trainer, module: nn.Module, ratio: float) -> None:
    """Give every ``B`` factor ``ratio ×`` its group's learning rate in each optimizer (and its schedulers); a
    ``PagedOptimizerPlugin`` keeps the groups, before or after this, whatever the callback order."""
    b_params = lora_plus_params(module)
    for optimizer in trainer.strategy.optimizers:
        added = split_lora_plus(optimizer, b_params, ratio)
        for config in trainer.lr_scheduler_configs:
            if config.scheduler.optimizer is optimizer:
                extend_scheduler(config.scheduler, added, ratio)


def _check_changed_base(spec: LoRASpec, trainer: L.Trainer) -> None:
    """LoftQ fits the quantization error of the base: it needs ``quantize:``."""
    if spec.init == "loftq" and not any(isinstance(s, QuantPlan) for s in transform_specs(trainer)):
        raise ConfigError(
            "lora.init='loftq' fits the adapters to the quantization error of the base, but this run does not "
            "quantize it (no quantize:). Fix: add quantize: (QuantizeBaseCallback), or lora.init='pissa'."
        )


def _trainable_new_heads(module: nn.Module) -> list[str]:
    """Outermost output heads of ``module`` that train now, before any adapter exists; not a language model's
    head (``get_output_embeddings``, tied to the embeddings: pretrained, and frozen on purpose)."""
    if adapter_param_ids(module):
        return []  # injected before: what is frozen now was frozen by the user's settings
    lm_heads = {
        id(out)
        for m in module.modules()
        if callable(f := getattr(m, "get_output_embeddings", None)) and (out := f()) is not None
    }
    names = sorted(output_head_names(module))
    heads = [n for n in names if not any(n.startswith(h + ".") for h in names if h != n)]
    return [
        name
        for name in heads
        if id(head := module.get_submodule(name)) not in lm_heads
        and "lm_head" not in name
        and any(p.requires_grad for p in head.parameters())
    ]
