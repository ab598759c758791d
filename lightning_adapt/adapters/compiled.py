"""Compile an adapted model with ``torch.compile``, block by block (regional compilation). Pure torch.

A transformer repeats one block (``model.layers[i]``) many times. Compiling each block in place with
``nn.Module.compile`` traces it once and reuses the code for every identical block (parameters are graph
inputs, not constants), so compile time is that of one block, not of the model; the module tree, the
state-dict keys and checkpoints stay those of the eager model (no ``_orig_mod.`` prefix), and every
``LoRALinear`` keeps working under it without graph breaks of its own (fused projections trace their plain
per-layer path).

Example:
    >>> compile_adapted(model)  # doctest: +SKIP
    ['model.layers.0', 'model.layers.1', ...]
"""

from __future__ import annotations

from typing import Any, Literal

from torch import nn

from lightning_adapt.layers import AdapterModule

__all__ = ["CompileScope", "compile_adapted", "compile_units"]

CompileScope = Literal["blocks", "model"]


def _holds_adapter(module: nn.Module) -> bool:
    return any(isinstance(m, AdapterModule) for m in module.modules())  # every LoRA kind


def compile_units(model: nn.Module, scope: CompileScope = "blocks") -> list[tuple[str, nn.Module]]:
    """What :func:`compile_adapted` compiles, as ``(dotted name, module)``; ``""`` names ``model`` itself.

    ``"blocks"``: every element of an (outermost) ``nn.ModuleList`` that holds a LoRA layer; when there is
    none, as ``"model"``. ``"model"``: every direct child of ``model`` that holds one (a LightningModule's
    Hugging Face model, whose forward includes the loss), or ``model`` itself when none does.
    """
    units: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules() if scope == "blocks" else ():
        if not isinstance(module, nn.ModuleList) or any(name.startswith(f"{unit}.") for unit, _ in units):
            continue
        prefix = f"{name}." if name else ""
        units += [(f"{prefix}{i}", block) for i, block in enumerate(module) if _holds_adapter(block)]
    if not units:
        units = [(name, child) for name, child in model.named_children() if _holds_adapter(child)]
    return units or [("", model)]


def compile_adapted(model: nn.Module, scope: CompileScope = "blocks", **options: Any) -> list[str]:
    """Compile the parts of ``model`` that hold LoRA layers in place (see :func:`compile_units`); idempotent.

    Compilation is lazy: it happens at each unit's first call. ``options`` go to ``torch.compile``
    (e.g. ``mode="max-autotune"``, ``backend="aot_eager"``); a unit compiled before keeps its compilation.

    Args:
        model: An adapted model (or a LightningModule holding one).
        scope: ``"blocks"`` (regional: compile time of one transformer block, reused by all of them) or
            ``"model"`` (whole forward passes, loss included: more fusion, compile time of the whole model).
        **options: Keyword arguments of ``torch.compile``.

    Returns:
        The dotted names of the compiled units (``""``: ``model`` itself).
    """
    units = compile_units(model, scope)
    for _, unit in units:
        if getattr(unit, "_compiled_call_impl", None) is None:
            unit.compile(**options)
    return [name for name, _ in units]
