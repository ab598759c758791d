"""The streaming merge engine: LoRA adapters folded into a base checkpoint tensor by tensor, straight from its
safetensors files (what to fold: :class:`Adapters`; the plan and the loop: :func:`stream_merge`). Pure torch.
The entry points that write export directories with it are in :mod:`lightning_adapt.export.stream_export`.

No model is built. For every tensor of the base checkpoint (``model.safetensors`` or the shards of
``model.safetensors.index.json``), in file order::

    W  = the stored tensor, read with plain reads (no memory map)
    W' = merged_weight(W, A, B, scaling, m)   adapted layer, fp32 (Conv1D: merged on Wᵀ, stored back (in, out))
    W' = the trained value                    a key of ``Adapters.replace`` (modules_to_save, other trained tensors)
    cast W' to the output dtype (default: the stored one), write it to the output shard, release it

Trained keys the checkpoint lacks (a new ``classifier``) follow the stored ones; ``Adapters.drop`` (a tied
``lm_head.weight``) is left out. :func:`~lightning_adapt.adapters.lora.merged_weight` is the one merge, also
behind the in-memory export, so both give the same bits.

Peak memory: the largest stored tensor, or three fp32 copies of the largest adapted one (``W``, ``ΔW``,
``W'``), plus the adapters; never the model. :mod:`lightning_adapt.export.adapter_sources` reads the
:class:`Adapters` from an adapter-only Lightning checkpoint or a PEFT adapter directory.

Example:
    >>> keys = model_keys(read_index("base/"))  # doctest: +SKIP
    >>> adapters = adapters_from_peft("adapter/", keys)  # doctest: +SKIP
    >>> stats = stream_merge(keys, Path("merged/"), adapters, torch.bfloat16, parse_size("5GB"))  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lightning_adapt.adapters.lora import merged_weight
from lightning_adapt.adapters.spec import LoRASpec
from lightning_adapt.errors import SETTING, ExportError
from lightning_adapt.export.safetensors_io import StoredTensor, TensorEntry, write_safetensors, written_bytes

__all__ = [
    "Adapters",
    "LayerAdapter",
    "OnMerge",
    "StreamStats",
    "stream_merge",
]


@dataclass(frozen=True)
class LayerAdapter:
    """One adapted layer: ``A (r, in)``, ``B (out, r)``, the DoRA magnitude ``(out,)`` if any."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float
    magnitude: torch.Tensor | None = None
    conv1d: bool = False  # the base weight is stored (in, out), as GPT-2's Conv1D

    def stored_shape(self) -> tuple[int, int]:
        dims = (int(self.lora_B.shape[0]), int(self.lora_A.shape[1]))
        return dims[::-1] if self.conv1d else dims

    def merge(self, stored: torch.Tensor) -> torch.Tensor:
        """The merged tensor in the stored orientation, fp32."""
        weight = stored.float()
        weight = weight.T if self.conv1d else weight
        merged = merged_weight(weight, self.lora_A, self.lora_B, self.scaling, self.magnitude)
        return merged.T if self.conv1d else merged


@dataclass
class Adapters:
    """What to fold into a base checkpoint, under the merged model's key names.

    Attributes:
        layers: adapted layer name (``model.layers.0.self_attn.q_proj``) -> its adapter.
        replace: tensor key -> trained value, written instead of the stored tensor (or after the stored ones
            when the checkpoint has no such key).
        drop: keys of the checkpoint not to write (a tied ``lm_head.weight``).
        settings: the LoRA settings every layer shares (r, alpha, dropout, rslora, dora: the PEFT adapter's).
        modules_to_save: the fully trained modules saved with the adapter.
        dtypes: a stored tensor's default output dtype when not its stored one (a live model's own dtype).
        changed_base: the layers' init (PiSSA / OLoRA / LoftQ) changed the base: each adapter is the rank-2r
            ``[A; A0]``, ``[B, -B0]`` on the original weight (``settings`` keep the trained rank r).
    """

    layers: dict[str, LayerAdapter]
    replace: dict[str, torch.Tensor] = field(default_factory=dict)
    drop: set[str] = field(default_factory=set)
    settings: LoRASpec | None = None
    modules_to_save: list[str] = field(default_factory=list)
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)
    changed_base: bool = False


@dataclass(frozen=True)
class StreamStats:
    """What :func:`stream_merge` wrote."""

    files: list[str]
    tensors: int
    merged_layers: int
    dropped: list[str]
    largest_key: str
    largest_fp32_bytes: int
    model_bytes: int
    first_float_dtype: torch.dtype | None


# --------------------------------------------------------------------------- the merge loop

OnMerge = Callable[[str, torch.Tensor, LayerAdapter, torch.Tensor], None]


def _entries(keys: Mapping[str, StoredTensor], adapters: Adapters, on_merge: OnMerge | None) -> list[TensorEntry]:
    """One entry per tensor to write, in checkpoint order, then the trained tensors the checkpoint lacks."""
    entries: list[TensorEntry] = []
    for key, stored in keys.items():
        layer = adapters.layers.get(key.removesuffix(".weight")) if key.endswith(".weight") else None
        if key in adapters.drop:
            continue
        if key in adapters.replace:
            entries.append(_value_entry(key, adapters.replace[key]))
        elif layer is not None:
            dtype = adapters.dtypes.get(key, stored.dtype)
            entries.append(TensorEntry(key, stored.shape, dtype, _merge_loader(key, stored, layer, on_merge)))
        else:
            dtype = adapters.dtypes.get(key, stored.dtype)
            entries.append(TensorEntry(key, stored.shape, dtype, stored.read, stored))
    for key, value in adapters.replace.items():
        if key not in keys:
            entries.append(_value_entry(key, value))
    missing = sorted(name for name in adapters.layers if name + ".weight" not in keys)
    if missing:
        raise ExportError(
            f"{SETTING}: adapted layers without a base weight in the checkpoint: {missing[:5]}.", setting="source_path"
        )
    return entries


def _value_entry(key: str, value: torch.Tensor) -> TensorEntry:
    return TensorEntry(key, tuple(value.shape), value.dtype, lambda: value.detach().cpu())


def _merge_loader(
    key: str, stored: StoredTensor, layer: LayerAdapter, on_merge: OnMerge | None
) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        if on_merge is None:  # the stored tensor is released as soon as its fp32 copy exists
            return layer.merge(stored.read())
        original = stored.read()
        merged = layer.merge(original)
        on_merge(key.removesuffix(".weight"), original, layer, merged)
        return merged

    return load


@torch.no_grad()
def stream_merge(
    keys: Mapping[str, StoredTensor],
    out: Path,
    adapters: Adapters,
    dtype: torch.dtype | None,
    max_shard: int,
    *,
    on_merge: OnMerge | None = None,
) -> StreamStats:
    """Write the merged checkpoint into the existing directory ``out`` (see the module docstring).

    Args:
        keys: the base checkpoint's tensors under the model's names (:func:`model_keys` of ``read_index``).
        out: the output directory (``model.safetensors`` or shards + index are written into it).
        adapters: what to merge, replace and drop.
        dtype: dtype of the floating tensors written; ``None`` keeps each tensor's own.
        max_shard: shard size in bytes.
        on_merge: called as ``on_merge(layer, stored W, adapter, merged W')`` for each adapted layer.
    """
    entries = _entries(keys, adapters, on_merge)
    files = write_safetensors(out, entries, dtype, max_shard)
    largest = max(keys, key=lambda k: math.prod(keys[k].shape), default="")
    floats = [e.dtype for e in entries if e.dtype.is_floating_point]
    return StreamStats(
        files=files,
        tensors=len(entries),
        merged_layers=len(adapters.layers),
        dropped=sorted(adapters.drop & set(keys)),
        largest_key=largest,
        largest_fp32_bytes=4 * math.prod(keys[largest].shape) if largest else 0,
        model_bytes=written_bytes(((e.shape, e.dtype) for e in entries), dtype),
        first_float_dtype=floats[0] if floats else None,
    )
