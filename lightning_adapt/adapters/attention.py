"""LoRA on ``nn.MultiheadAttention``: its projections through merged weights, computed on every forward. Pure torch.

``nn.MultiheadAttention`` keeps q/k/v in one raw ``in_proj_weight`` ``(3E, E)`` (or ``q/k/v_proj_weight`` when
``kdim``/``vdim`` differ) and hands ``out_proj.weight`` straight to ``F.multi_head_attention_forward``: no
``nn.Linear`` forward runs, so a LoRA on ``out_proj`` alone would never act. :class:`LoRAMultiheadAttention`
adapts them all and calls ``F.multi_head_attention_forward`` with the effective weights::

    in_proj' = in_proj + scaling · B_in @ A_in          (or q/k/v each)    differentiable in A, B
    out_proj' = out_proj + scaling · B_out @ A_out      (a LoRAProjection in base_layer.out_proj, as PEFT)

Exactly what :meth:`merge` writes, so merged == unmerged, and a fresh adapter (``B = 0``) gives the base's
outputs bit for bit. Keys, as PEFT: ``<name>.lora_A.weight`` / ``lora_B.weight`` (in_proj),
``<name>.base_layer.out_proj.lora_A.weight`` / ``lora_B.weight``; with separate q/k/v:
``<name>.lora_A.{q,k,v}_proj.weight``. Dropout does not apply inside attention (the update acts through
the weights), as in PEFT.

``nn.TransformerEncoderLayer`` reads ``self_attn.in_proj_weight`` / ``self_attn.out_proj.weight`` for its
inference fast path; the wrapper answers with the effective weights, so that path stays exact too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import nn

from lightning_adapt.adapters.delta import InitMethod, init_lora_pair, lora_delta, merged_weight
from lightning_adapt.adapters.kinds import WeightAdapter

__all__ = ["LoRAMultiheadAttention", "LoRAProjection"]

_SEPARATE = ("q_proj", "k_proj", "v_proj")


class Projection(NamedTuple):
    """What ``self_attn.out_proj`` answers outside the wrapper: the effective weight and the bias."""

    weight: torch.Tensor
    bias: torch.Tensor | None


class LoRAProjection(WeightAdapter):
    """LoRA on a linear projection whose owner reads its ``weight`` directly (an attention's ``out_proj``).

    Keys as :class:`~lightning_adapt.adapters.lora.LoRALinear`'s (``base_layer.weight``, ``lora_A.weight`` ``(r, in)``,
    ``lora_B.weight`` ``(out, r)``); its owner uses :meth:`merged_weight`, and so does its own forward.
    """

    base_layer: nn.Linear

    def add_factors(self, init: InitMethod) -> None:
        fp32 = {"bias": False, "device": self.base_layer.weight.device, "dtype": torch.float32}
        self.lora_A = nn.Linear(self.base_layer.in_features, self.r, **fp32)  # type: ignore[arg-type]
        self.lora_B = nn.Linear(self.r, self.base_layer.out_features, **fp32)  # type: ignore[arg-type]
        init_lora_pair(self.lora_A.weight, self.lora_B.weight, init, self.r)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A.weight, self.lora_B.weight

    def to_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return weight

    def from_matrix(self, matrix: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return matrix

    def bias_and_dtype(self) -> tuple[torch.Tensor | None, torch.dtype]:
        return self.base_layer.bias, self.base_layer.weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias, dtype = self.bias_and_dtype()
        return F.linear(x, self.merged_weight().to(dtype), bias)


class LoRAMultiheadAttention(WeightAdapter):
    """LoRA on every projection of an ``nn.MultiheadAttention`` (see the module docstring).

    Args:
        base_layer: the attention to adapt; its ``out_proj`` is wrapped in a :class:`LoRAProjection` in place.
        r, alpha, dropout, init, use_rslora: as :class:`~lightning_adapt.adapters.lora.LoRALinear` (dropout is
            recorded, not applied).
    """

    base_layer: nn.MultiheadAttention

    def add_factors(self, init: InitMethod) -> None:
        base, r = self.base_layer, self.r
        fp32 = {"bias": False, "device": base.out_proj.weight.device, "dtype": torch.float32}
        base.out_proj = LoRAProjection(base.out_proj, r, self.alpha, self.dropout, init, self.use_rslora)  # type: ignore[assignment]
        e = base.embed_dim
        if base._qkv_same_embed_dim:
            self.lora_A: nn.Module = nn.Linear(e, r, **fp32)  # type: ignore[arg-type]
            self.lora_B: nn.Module = nn.Linear(r, 3 * e, **fp32)  # type: ignore[arg-type]
        else:
            ins = dict(zip(_SEPARATE, (e, base.kdim, base.vdim), strict=True))
            self.lora_A = nn.ModuleDict({p: nn.Linear(n, r, **fp32) for p, n in ins.items()})  # type: ignore[arg-type]
            self.lora_B = nn.ModuleDict({p: nn.Linear(r, e, **fp32) for p in ins})  # type: ignore[arg-type]
        for lora_a, lora_b in self.pairs().values():
            init_lora_pair(lora_a, lora_b, init, r)

    @property
    def attention(self) -> nn.MultiheadAttention:
        return self.base_layer

    @property
    def out_lora(self) -> LoRAProjection:
        return cast(LoRAProjection, self.attention.out_proj)

    def pairs(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{parameter name: (A (r, in), B (out, r))}`` for ``in_proj_weight`` or ``q/k/v_proj_weight``."""
        if isinstance(self.lora_A, nn.Linear) and isinstance(self.lora_B, nn.Linear):
            return {"in_proj_weight": (self.lora_A.weight, self.lora_B.weight)}
        a, b = cast(nn.ModuleDict, self.lora_A), cast(nn.ModuleDict, self.lora_B)
        return {f"{p}_weight": (cast(torch.Tensor, a[p].weight), cast(torch.Tensor, b[p].weight)) for p in _SEPARATE}

    def adapter_params(self) -> list[nn.Parameter]:
        own = [p for name, p in self.named_parameters() if name.startswith("lora_")]
        return own + self.out_lora.adapter_params()

    def effective(self, name: str) -> torch.Tensor:
        """The weight ``name`` (``in_proj_weight``, ``q_proj_weight``, ...) with its update, in its own dtype."""
        weight = cast(torch.Tensor, getattr(self.attention, name))
        if self.merged:
            return weight
        lora_a, lora_b = self.pairs()[name]
        return merged_weight(weight, lora_a, lora_b, self.scaling).to(weight.dtype)

    def effective_out(self) -> torch.Tensor:
        """``out_proj``'s weight with its update, in its own dtype."""
        return self.out_lora.merged_weight().to(self.out_lora.bias_and_dtype()[1])

    def merged_parameters(self) -> dict[str, Callable[[], torch.Tensor]]:
        """``in_proj_weight`` (or q/k/v) merged, fp32; ``out_proj`` is a :class:`LoRAProjection` and merges itself."""
        return {name: (lambda name=name: self.effective(name).float()) for name in self.pairs()}  # type: ignore[misc]

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            for name in self.pairs():
                cast(torch.Tensor, getattr(self.attention, name)).copy_(self.effective(name))
            self.out_lora.merge()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            for name, (lora_a, lora_b) in self.pairs().items():
                weight = cast(torch.Tensor, getattr(self.attention, name))
                weight.copy_(weight.float() - lora_delta(lora_a, lora_b, self.scaling).to(weight.device))
            self.out_lora.unmerge()
            self.merged = False

    def merged_module(self) -> nn.Module:
        self.merge()
        self.attention.out_proj = self.out_lora.merged_module()  # type: ignore[assignment]
        return self.attention

    def __getattr__(self, name: str) -> Any:
        # What code around an attention reads of it (TransformerEncoderLayer: batch_first, num_heads, the
        # weights of its fast path): the base's attributes, with the effective weights in place of the raw ones.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer" or (name.startswith("_") and name != "_qkv_same_embed_dim"):
                raise
        if name in ("in_proj_weight", *(f"{p}_weight" for p in _SEPARATE)) and name in self.pairs():
            return self.effective(name)
        if name == "out_proj":
            return Projection(self.effective_out(), self.out_lora.bias_and_dtype()[0])
        return getattr(self.attention, name)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``nn.MultiheadAttention.forward``'s general path (masks, ``batch_first``, separate q/k/v) with the
        effective weights."""
        mha = self.attention
        other = F._none_or_dtype(attn_mask)
        key_padding_mask = F._canonical_mask(key_padding_mask, "key_padding_mask", other, "attn_mask", query.dtype)
        attn_mask = F._canonical_mask(attn_mask, "attn_mask", None, "", query.dtype, check_other=False)
        batched = mha.batch_first and query.dim() == 3
        if batched:  # transposed as MultiheadAttention does, keeping `query is key is value` (one packed matmul)
            if query is key is value:
                query = key = value = query.transpose(1, 0)
            elif key is value:
                query, key = query.transpose(1, 0), key.transpose(1, 0)
                value = key
            else:
                query, key, value = (t.transpose(1, 0) for t in (query, key, value))
        weights = {name: self.effective(name) for name in self.pairs()}
        out, attention = F.multi_head_attention_forward(
            query, key, value, mha.embed_dim, mha.num_heads, weights.get("in_proj_weight"), mha.in_proj_bias,
            mha.bias_k, mha.bias_v, mha.add_zero_attn, mha.dropout, self.effective_out(), self.out_lora.bias_and_dtype()[0],
            training=mha.training, key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
            use_separate_proj_weight=not mha._qkv_same_embed_dim, q_proj_weight=weights.get("q_proj_weight"),
            k_proj_weight=weights.get("k_proj_weight"), v_proj_weight=weights.get("v_proj_weight"),
            average_attn_weights=average_attn_weights, is_causal=is_causal,
        )  # fmt: skip
        return (out.transpose(1, 0) if batched else out), attention
