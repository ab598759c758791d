"""Where PiSSA / OLoRA / LoftQ meet quantization: the layers whose base a LoRA spec changes are prepared from their
full-precision weight, one at a time, right before they are quantized. Pure torch.

A LoRA callback hands :class:`ChangedBaseHook` to the module before ``configure_model``
(:func:`~lightning_adapt.adapters.init.attach_before_quantize`); whatever quantizes the module's layers
(:func:`~lightning_adapt.loading.load_pretrained` while loading, ``QuantizeBaseCallback`` afterwards) asks it which
layers to prepare (:meth:`ChangedBaseHook.targets`) and calls it on each full-precision layer: the changed base is
written into the layer, and the returned function leaves ``(A₀, B₀)`` on its quantized replacement for the adapter.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from lightning_adapt.adapters.delta import lora_layers, lora_scaling
from lightning_adapt.adapters.init import CHANGED_BASE_INITS, Roundtrip, remember_pair
from lightning_adapt.adapters.lora import prepare_base
from lightning_adapt.adapters.spec import LoRASpec
from lightning_adapt.adapters.targeting import find_targets

__all__ = ["ChangedBaseHook", "changed_base_hook", "init_targets"]


def init_targets(model: nn.Module, spec: LoRASpec | None) -> set[str]:
    """The layers of ``model`` whose base ``spec`` changes (its module targets; none for a random ``init``, or once
    ``model`` holds adapters: a later ``configure_model`` changes nothing). Works on a model built on the meta device:
    only names and types are read."""
    if spec is None or spec.init not in CHANGED_BASE_INITS or lora_layers(model):
        return set()
    modules = spec.target_modules
    if modules is not None and not isinstance(modules, str) and not list(modules):
        return set()  # target_parameters only
    return set(find_targets(model, modules, spec.exclude_modules))


@dataclass(frozen=True)
class ChangedBaseHook:
    """Prepare the bases ``spec`` changes before they are quantized (the :class:`~lightning_adapt.adapters.init.BeforeQuantize`
    hook)."""

    spec: LoRASpec

    def targets(self, model: nn.Module) -> set[str]:
        """:func:`init_targets` of the spec."""
        return init_targets(model, self.spec)

    def __call__(self, layer: nn.Module, roundtrip: Roundtrip) -> Callable[[nn.Module], None]:
        """:func:`~lightning_adapt.adapters.lora.prepare_base` with the spec's init, rank, scaling and LoftQ
        iterations on the full-precision ``layer``; ``roundtrip``: how it is about to be quantized (LoftQ fits its
        error). Returns what leaves ``(A₀, B₀)`` on the quantized layer that replaces it."""
        spec = self.spec
        scaling = lora_scaling(spec.r, spec.alpha, spec.use_rslora)
        loftq = roundtrip if spec.init == "loftq" else None
        pair = prepare_base(layer, spec.init, spec.r, scaling, loftq, spec.loftq_iterations)
        return functools.partial(_remember, pair=pair)


def _remember(layer: nn.Module, pair: tuple[object, object]) -> None:
    remember_pair(layer, pair)  # type: ignore[arg-type]


def changed_base_hook(spec: LoRASpec) -> ChangedBaseHook | None:
    """The hook for ``spec``, or ``None`` when its ``init`` keeps the base."""
    return ChangedBaseHook(spec) if spec.init in CHANGED_BASE_INITS else None
