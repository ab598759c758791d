"""Let FSDP2 shard 4-bit weights: the packed codes become a plain frozen parameter, the quantization state a
per-layer attribute.

bitsandbytes keeps a ``Linear4bit``'s quantization state (block absmaxes, code table, nested state) on its
``Params4bit`` weight. FSDP2's ``fully_shard`` replaces every parameter by a plain ``nn.Parameter`` holding a
``DTensor`` shard and, before each forward, by the all-gathered plain tensor: the state is lost, and
bitsandbytes' own recovery re-creates the parameter inside ``forward`` (behind FSDP2's back). A layer made
shardable here reads its state from ``layer.shard_quant_state`` instead, so FSDP2 shards and all-gathers
the packed codes like any other tensor (dimension 0 of the ``(n/2, 1)`` uint8 array) while the state, about
3% of the 4-bit bytes with double quantization, stays whole on every rank. The forward is bitsandbytes'
``matmul_4bit`` on the same codes and state: bit-identical to the unsharded layer.

Only 4-bit layers are made shardable; int8 (``Linear8bitLt``) keeps its row scales on the weight and its
matmul state on the layer, and is left replicated (``ignored_params``).
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import torch
from torch import nn

from lightning_adapt.layers import require_bitsandbytes

__all__ = ["SHARD_STATE_ATTR", "is_4bit", "make_shardable"]

#: the attribute holding a shardable layer's quantization state (``bitsandbytes.functional.QuantState``)
SHARD_STATE_ATTR = "shard_quant_state"


def is_4bit(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes ``Linear4bit`` (shardable or not)."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def make_shardable(layer: nn.Module, device: torch.device) -> None:
    """Make the quantized ``Linear4bit`` ``layer`` shardable by FSDP2, in place (idempotent).

    Its quantization state moves to ``device`` (where FSDP2 puts the shards and runs the forward) and onto
    the layer; its class becomes a subclass whose ``forward`` reads the state from there.
    """
    if getattr(layer, SHARD_STATE_ATTR, None) is not None:
        return
    state = getattr(layer.weight, "quant_state", None)
    if state is None:
        raise TypeError(f"make_shardable: {type(layer).__name__} holds no quantized 4-bit weight.")
    state.to(device)  # in place: absmax, code, nested state
    setattr(layer, SHARD_STATE_ATTR, state)
    layer.__class__ = _shardable_class(type(layer))  # type: ignore[arg-type]


@functools.cache
def _shardable_class(base: type) -> type:
    bnb = require_bitsandbytes()

    def forward(self: Any, x: torch.Tensor) -> torch.Tensor:
        # As Linear4bit.forward, minus its quant-state recovery and CPU repacking (disabled by quantize_linear).
        input_dtype = x.dtype
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        out: torch.Tensor = bnb.matmul_4bit(x, self.weight, bias=bias, quant_state=getattr(self, SHARD_STATE_ATTR))
        return out.to(input_dtype)

    def save(self: Any, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        # As Linear4bit: weight and bias, then the quant state under weight.* (the keys and values of the
        # unsharded layer, so the base fingerprint is the same on every world size).
        nn.Module._save_to_state_dict(self, destination, prefix, keep_vars)
        for key, value in getattr(self, SHARD_STATE_ATTR).as_dict(packed=True).items():
            destination[prefix + "weight." + key] = value if keep_vars else value.detach()

    doc = f"{base.__name__} whose quantization state lives on the layer, so FSDP2 can shard its codes."
    attrs = {"forward": forward, "_save_to_state_dict": save, "__doc__": doc}
    return type(f"Shardable{base.__name__}", (base,), attrs)
