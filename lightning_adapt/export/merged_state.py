"""The merged model's state dict as lazily computed tensors. Pure torch (no Lightning).

:func:`merged_entries` lists, under the un-adapted model's key names and in ``state_dict`` order, every
persistent tensor of a module with each LoRA wrapper folded in (:class:`~lightning_adapt.adapters.lora.LoRALinear`,
and the conv / embedding / attention wrappers, whose ``merged_parameters()`` name the base parameters they replace)::

    W' = W + ΔW                         ΔW = scaling · B @ A            (out, in), fp32
    W' = m · (W + ΔW) / ‖W + ΔW‖_row    DoRA, m = lora_magnitude_vector  (out,)

``W`` is the base weight held in memory (dequantized for a quantized base) or, given a
:class:`~lightning_adapt.export.safetensors_io.SourceWeights`, the original full-precision weight re-read from
the checkpoint. Nothing is computed until an entry's ``load()`` is called, one tensor at a time; the
module is not modified.

Example:
    >>> entries, dropped = merged_entries(model, source=None, tied="copy")  # doctest: +SKIP
    >>> write_safetensors(Path("merged"), entries, None, parse_size("5GB"))  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from lightning_adapt.adapters.delta import lora_layers
from lightning_adapt.adapters.kinds import WeightAdapter
from lightning_adapt.adapters.lora import LoRALinear
from lightning_adapt.errors import ExportError
from lightning_adapt.export.safetensors_io import SourceWeights, TensorEntry
from lightning_adapt.layers import as_stored, base_weight, is_conv1d, is_quantized

__all__ = ["check_tied_adapters", "merged_entries"]

TiedMode = Literal["drop", "copy"]


@torch.no_grad()
def _natural_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype the layer's weight had before quantization (else its own floating dtype, else fp32)."""
    dtype = getattr(layer, "original_dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    weight = getattr(layer, "weight", None)
    return weight.dtype if isinstance(weight, torch.Tensor) and weight.is_floating_point() else torch.float32


class _Merger:
    """Collects the entries; ``seen`` holds the ids of tensors already listed (for tied weights)."""

    def __init__(self, source: SourceWeights | None, tied: TiedMode) -> None:
        self.source, self.tied = source, tied
        self.seen: set[int] = set()
        self.dropped: list[str] = []
        self.entries: list[TensorEntry] = []

    def original(self, layer: nn.Module) -> bool:
        """Whether :meth:`base` gives ``layer``'s original weight (re-read), not the live base."""
        return self.source is not None and is_quantized(layer)

    def base(self, key: str, layer: nn.Module) -> torch.Tensor:
        if self.source is not None and self.original(layer):
            return as_stored(layer, self.source.get(key).float())  # to (out, in)
        return base_weight(layer).cpu()

    def weight_entry(self, prefix: str, layer: nn.Module) -> None:
        base = layer.base_layer if isinstance(layer, LoRALinear) else layer
        key = prefix + "weight"

        def load() -> torch.Tensor:
            weight = self.base(key, base)
            if isinstance(layer, LoRALinear) and not layer.merged and self.original(base) and layer.changes_base:
                weight = layer.merged_weight_from_original(weight)  # W + s(BA - B0A0): PiSSA / OLoRA / LoftQ
            elif isinstance(layer, LoRALinear) and not layer.merged:
                weight = layer.merged_weight(weight)
            return as_stored(base, weight)

        dims = (int(getattr(layer, "out_features", 0)), int(getattr(layer, "in_features", 0)))
        self.entries.append(TensorEntry(key, dims[::-1] if is_conv1d(base) else dims, _natural_dtype(base), load))
        bias = getattr(base, "bias", None)
        if isinstance(bias, torch.Tensor):
            self.tensor_entry(prefix + "bias", bias)

    def tensor_entry(self, key: str, tensor: torch.Tensor) -> None:
        if id(tensor) in self.seen and self.tied == "drop":
            self.dropped.append(key)  # safetensors refuses shared tensors; from_pretrained re-ties
            return
        self.seen.add(id(tensor))
        # the writer streams bytes, so a tensor listed under two keys needs no copy
        self.entries.append(TensorEntry(key, tuple(tensor.shape), tensor.dtype, lambda: tensor.detach().cpu()))

    def merged_entry(self, key: str, param: torch.Tensor, load: Callable[[], torch.Tensor]) -> None:
        self.seen.add(id(param))
        self.entries.append(TensorEntry(key, tuple(param.shape), param.dtype, lambda: load().detach().cpu()))

    def walk(
        self, module: nn.Module, prefix: str = "", merged: dict[str, Callable[[], torch.Tensor]] | None = None
    ) -> None:
        if isinstance(module, LoRALinear) or is_quantized(module):
            self.weight_entry(prefix, module)
            return
        if isinstance(module, WeightAdapter):  # its base under the wrapper's name, the adapted parameters merged
            self.walk(module.base_layer, prefix, None if module.merged else module.merged_parameters())
            return
        for name, param in module._parameters.items():
            if param is not None and merged and name in merged:
                self.merged_entry(prefix + name, param, merged[name])
            elif param is not None:
                self.tensor_entry(prefix + name, param)
        for name, buf in module._buffers.items():
            if buf is not None and name not in module._non_persistent_buffers_set:
                self.tensor_entry(prefix + name, buf)
        for name, child in module._modules.items():
            if child is not None:
                self.walk(child, f"{prefix}{name}.")


def merged_entries(
    root: nn.Module, source: SourceWeights | None, tied: TiedMode
) -> tuple[list[TensorEntry], list[str]]:
    """``(entries, dropped keys)`` of the merged state of ``root`` (see the module docstring).

    Args:
        root: the adapted module; adapted and quantized layers appear as ``<name>.weight`` (+ ``.bias``).
        source: the original weights of the quantized layers; ``None`` merges into the dequantized ones.
        tied: ``"drop"`` lists a tensor shared by several keys once (``from_pretrained`` re-ties it) and
            returns the other keys as dropped; ``"copy"`` lists it under every key (loads ``strict=True``).
    """
    merger = _Merger(source, tied)
    merger.walk(root)
    return merger.entries, merger.dropped


def check_tied_adapters(root: nn.Module) -> None:
    """Refuse an adapted layer whose base weight is shared (tied lm_head): it would be re-tied on load.

    Raises:
        ExportError: naming the adapted layers and the fix.
    """
    ids: dict[int, int] = {}
    for _, param in root.named_parameters(remove_duplicate=False):
        ids[id(param)] = ids.get(id(param), 0) + 1
    tied = [n for n, layer in lora_layers(root) if any(ids.get(id(t), 0) > 1 for t in _adapted(layer))]
    if tied:
        raise ExportError(
            f"target_modules adapts {tied}, whose weight is tied to another module: the merged weight would be "
            "re-tied (and lost) on load. Fix: exclude it from target_modules (add it to exclude_modules)."
        )


def _adapted(layer: nn.Module) -> list[object]:
    """The base tensors a LoRA wrapper changes when merged."""
    if isinstance(layer, WeightAdapter):
        return [getattr(layer.base_layer, name) for name in layer.merged_parameters()]
    return [getattr(getattr(layer, "base_layer", None), "weight", None)]
