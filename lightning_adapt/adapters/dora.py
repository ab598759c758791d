"""DoRA's per-step math without materialising ``W + ΔW``. Pure torch: nothing here imports Lightning.

DoRA (weight-decomposed LoRA) adds to the base output ``W x + b``::

    (m/n - 1) ⊙ W x  +  (m/n) ⊙ s · B A x          n = ‖W + s·B A‖_row   (detached, as in PEFT)

PEFT builds the ``(out, in)`` matrix ``W + s·B A`` every step to take its row norms. Here the norm comes
from ``r``-wide products instead (exact algebra; only the rounding differs)::

    n² = ‖W‖²_row + 2s · rowsum(B ∘ (W Aᵀ)) + s² · rowsum((B (A Aᵀ)) ∘ B)

``‖W‖²_row`` is frozen, so it is cached per base layer (:func:`base_row_sq_norm`) and recomputed when the
weight changes (see there); ``W Aᵀ`` (``out × r``) reads ``W`` once and writes nothing of its size. The
base output ``W x`` is reused from the base layer when no dropout is active; with dropout, ``W`` must see
the dropped-out input (PEFT's semantics), so ``W · dropout(x)`` is computed from the same dense ``W``
(one dequantization per step for a 4-bit base, shared with the norm).

Rounding: ``n²`` is a sum of terms of size ``‖W‖²``; its relative error is about ``ε · ‖W‖² / n²``
(``ε`` = 6e-8 in fp32), i.e. as exact as the direct norm unless an update cancels most of a row.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

__all__ = ["base_row_sq_norm", "clear_dora_cache", "dora_delta", "dora_row_norm"]

# base layer -> (fingerprint of its weight, ‖W‖²_row in fp32); entries die with their layer.
_ROW_SQ: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[Any, ...], torch.Tensor]] = weakref.WeakKeyDictionary()


def _fingerprint(layer: nn.Module, weight: torch.Tensor) -> tuple[Any, ...] | None:
    """What must be unchanged for a cached ``‖W‖²_row`` to stay valid; ``None``: do not cache."""
    stored = getattr(layer, "weight", None)
    if not isinstance(stored, torch.Tensor) or isinstance(stored, DTensor) or torch.compiler.is_compiling():
        return None
    if stored.is_inference():  # no version counter to watch
        return None
    state = getattr(stored, "quant_state", None) or getattr(layer, "shard_quant_state", None)
    try:
        state_ref = None if state is None else weakref.ref(state)
    except TypeError:  # a state that cannot be weakly referenced: no safe identity, no cache
        return None
    # The storage object itself (weakly: a freed storage never matches a new one at the same address),
    # the version counter (every in-place write; layers.layer_writer bumps it for its `.data` writes),
    # the view on the storage, and what the dense weight is read as.
    storage = weakref.ref(stored.untyped_storage())
    view = (stored._version, stored.dtype, stored.device, tuple(stored.shape), stored.stride(), stored.storage_offset())
    return (storage, view, state_ref, weight.dtype, weight.device)


def base_row_sq_norm(layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """``‖W‖²_row`` (fp32 or wider), shape ``(out,)``, of ``layer``'s dense ``weight`` (``(out, in)``), cached.

    The cache entry is keyed by ``layer`` (weakly) and checked against the stored weight's storage object,
    version counter, view, dtype and device, and the 4-bit quant state: merge / unmerge (their writes
    bump the version), ``load_state_dict`` (``copy_``), ``.to()`` / ``.half()`` (new storage) and any
    in-place op all invalidate it. A write through ``weight.data`` bypasses the version counter: call
    :func:`clear_dora_cache` after one. DTensor weights and compiled graphs are not cached.
    """
    key = _fingerprint(layer, weight)
    entry = _ROW_SQ.get(layer) if key is not None else None
    if entry is not None and entry[0] == key:
        return entry[1]
    with torch.no_grad():
        row_sq = weight.detach().to(_at_least_fp32(weight)).pow(2).sum(dim=1)
    if key is not None:
        _ROW_SQ[layer] = (key, row_sq)
    return row_sq


def clear_dora_cache(layer: nn.Module | None = None) -> None:
    """Forget the cached ``‖W‖²_row`` of ``layer`` (every layer when ``None``)."""
    if layer is None:
        _ROW_SQ.clear()
    else:
        _ROW_SQ.pop(layer, None)


def dora_row_norm(
    weight: torch.Tensor, row_sq: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float
) -> torch.Tensor:
    """``‖W + s·B A‖_row`` (shape ``(out,)``, fp32 or ``weight``'s wider dtype, detached), without the ``(out, in)`` sum.

    Args:
        weight: dense ``W``, ``(out, in)``, in the adapters' dtype.
        row_sq: ``‖W‖²_row``, ``(out,)`` (:func:`base_row_sq_norm`).
        lora_A: ``(r, in)``. lora_B: ``(out, r)``. scaling: ``s``.
    """
    with torch.no_grad():
        dtype = _at_least_fp32(weight)
        weight, a, b = weight.detach().to(dtype), lora_A.detach().to(dtype), lora_B.detach().to(dtype)
        cross = (b * (weight @ a.T)).sum(dim=1)  # rowsum(B ∘ W Aᵀ)
        quad = ((b @ (a @ a.T)) * b).sum(dim=1)  # rowsum(B (A Aᵀ) ∘ B) = ‖B A‖²_row
        squared = row_sq + (2 * scaling) * cross + (scaling * scaling) * quad
        return squared.clamp_min_(0).sqrt_()


def dora_delta(
    x: torch.Tensor,
    base_out: torch.Tensor,
    base_layer: nn.Module,
    weight: torch.Tensor,
    lora_A: nn.Module,
    lora_B: nn.Module,
    magnitude: torch.Tensor,
    scaling: float,
    dropout: nn.Module | None,
) -> torch.Tensor:
    """What DoRA adds to ``base_out``: ``(m/n - 1) ⊙ (W x') + (m/n) ⊙ s · B A x'`` (bias excluded).

    Args:
        x: the layer input in the adapters' dtype, ``(..., in)``.
        base_out: ``base_layer(x)`` (``W x + b``), ``(..., out)``; reused as ``W x`` unless dropout is active.
        base_layer: the frozen layer (Linear, Conv1D, 4-bit, 8-bit): its bias, and the key of the ‖W‖² cache.
        weight: its dense ``W``, ``(out, in)``, in ``x``'s dtype (``layers.base_weight``: one dequantization
            of a 4-bit base, used for the norm and, with dropout, for ``W · dropout(x)``).
        lora_A, lora_B: the adapter modules (``r × in``, ``out × r`` weights); ``lora_A`` is called, ``lora_B``'s
            weight is used directly (scaled by ``m/n · s`` per row).
        magnitude: ``m``, ``(out,)``, trained.
        scaling: ``s``.
        dropout: the adapter dropout when training (``None`` or ``nn.Identity``: none), applied to ``x``
            for both terms (``x' = dropout(x)``), as PEFT does.

    Returns:
        ``(..., out)`` in ``x``'s dtype; gradients reach ``m``, ``A``, ``B`` and ``x`` as in PEFT's DoRA.
    """
    lora_a, lora_b = _weight_of(lora_A), _weight_of(lora_B)
    norm = dora_row_norm(weight, base_row_sq_norm(base_layer, weight), lora_a, lora_b, scaling)
    scale = magnitude / norm
    bias = getattr(base_layer, "bias", None)
    if dropout is None or isinstance(dropout, nn.Identity):
        base_result = base_out.to(x.dtype)
        offset = None if bias is None else (1 - scale) * bias.to(x.dtype)  # removes b from (m/n - 1)·(W x + b)
    else:
        x = dropout(x)
        base_result, offset = F.linear(x, weight), None
    # (m/n)·s scales B's rows (out × r) rather than the tokens × out product: one such pass less each way.
    projected = lora_A(x)
    scaled_b = lora_b * (scale * scaling).unsqueeze(1)
    if offset is None:
        update = F.linear(projected, scaled_b)
    else:  # the bias correction rides in the matmul's epilogue
        flat = torch.addmm(offset, projected.reshape(-1, projected.shape[-1]), scaled_b.t())
        update = flat.view(*projected.shape[:-1], flat.shape[-1])
    return torch.addcmul(update, base_result, scale - 1)


def _at_least_fp32(tensor: torch.Tensor) -> torch.dtype:
    return torch.promote_types(tensor.dtype, torch.float32)


def _weight_of(module: nn.Module) -> torch.Tensor:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"dora_delta: {type(module).__name__} has no weight tensor.")
    return weight
