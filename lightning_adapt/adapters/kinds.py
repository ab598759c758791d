"""LoRA on the other layer kinds PyTorch users train: ``nn.Conv1d/2d/3d`` and ``nn.Embedding``. Pure torch.

Each wrapper holds one frozen ``base_layer`` and a rank-``r`` update of its one ``weight``, seen as a matrix
``(out, in)`` so that the merge is the one of :func:`lightning_adapt.adapters.delta.merged_weight`::

    Conv  W (out, in, *k):  matrix W.flatten(1)   A = lora_A.weight.flatten(1) (r, in·∏k)   B (out, r)
    Embedding W (num, dim): matrix Wᵀ (dim, num)   A = lora_embedding_A (r, num)           B = lora_embedding_B (dim, r)
    W' = W + scaling · B @ A  (reshaped / transposed back)

State-dict keys follow PEFT (``lora_A.weight`` / ``lora_B.weight`` for convs, ``lora_embedding_A`` /
``lora_embedding_B`` for embeddings), so :mod:`lightning_adapt.export.peft_format` writes them as they are.
Adapters are fp32 and stay so under down-casts, as in :class:`~lightning_adapt.adapters.lora.LoRALinear`.

Example:
    >>> layer = LoRAConv(nn.Conv2d(3, 8, 3, padding=1), r=4, alpha=8.0)
    >>> x = torch.ones(1, 3, 5, 5)
    >>> torch.equal(layer(x), layer.base_layer(x))  # B = 0 at init
    True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypedDict, cast

import torch
import torch.nn.functional as F
from torch import nn

from lightning_adapt.adapters.delta import (
    InitMethod,
    init_lora_pair,
    keep_adapter_precision,
    lora_arg_problems,
    lora_delta,
    lora_scaling,
    merged_weight,
)
from lightning_adapt.errors import ConfigError

__all__ = ["AdapterOptions", "LoRAConv", "LoRAEmbedding", "WeightAdapter", "check_adaptable"]

_CONVS: dict[int, type[nn.Conv1d | nn.Conv2d | nn.Conv3d]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class AdapterOptions(TypedDict, total=False):
    """:class:`WeightAdapter`'s keyword options, for wrappers that pass them through (``LoRAParameters``)."""

    dropout: float
    init: InitMethod
    use_rslora: bool


def check_adaptable(name: str, layer: nn.Module, use_dora: bool = False) -> None:
    """Refuse, in one line naming ``name`` and the fix, a layer whose LoRA could not be exact or merged."""
    kind = type(layer).__name__
    if use_dora and not isinstance(layer, nn.Linear):
        raise ConfigError(
            f"{name} ({kind}): DoRA is implemented for linear layers only. Fix: use_dora=False, or add it to "
            "exclude_modules."
        )
    if isinstance(layer, nn.Conv1d | nn.Conv2d | nn.Conv3d) and layer.groups != 1:
        raise ConfigError(
            f"{name} ({kind}, groups={layer.groups}): LoRA on grouped/depthwise convolutions is not supported. "
            f"Fix: remove it from target_modules (or add it to exclude_modules)."
        )
    if isinstance(layer, nn.Embedding) and layer.max_norm is not None:
        raise ConfigError(
            f"{name} ({kind}, max_norm={layer.max_norm}): the lookup renormalizes its weight in place, so a merged "
            "update would not equal the adapter. Fix: remove it from target_modules (or add it to exclude_modules)."
        )


def _overwrite(param: torch.Tensor, value: torch.Tensor) -> None:
    # as layers._write: outside autograd, but bumping the version counter that caches of the weight read
    param.data.copy_(value)
    torch.autograd.graph.increment_version(param)


class WeightAdapter(nn.Module):
    """What every LoRA wrapper of a non-linear kind shares: settings, fp32 adapters, merge/unmerge of ``weight``.

    A subclass defines :meth:`factors` (``A (r, in)``, ``B (out, r)``) and how its stored weight is seen as the
    ``(out, in)`` matrix (:meth:`to_matrix` / :meth:`from_matrix`); the merge is
    :func:`~lightning_adapt.adapters.delta.merged_weight`'s.
    """

    base_layer: nn.Module

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        init: InitMethod = "kaiming",
        use_rslora: bool = False,
    ) -> None:
        if problems := lora_arg_problems(r, alpha, dropout):
            raise ConfigError(f"Invalid {type(self).__name__} arguments:\n  - " + "\n  - ".join(problems))
        check_adaptable(type(base_layer).__name__, base_layer)
        super().__init__()
        self.base_layer = base_layer.requires_grad_(False)
        self.r, self.alpha, self.dropout, self.use_rslora = r, float(alpha), dropout, use_rslora
        self.scaling = lora_scaling(r, self.alpha, use_rslora)
        self.merged = False
        # The setting of the spec; applied where the adapter reads a float input (convs), as in PEFT.
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.add_factors(init)

    def add_factors(self, init: InitMethod) -> None:
        """Create the fp32 factors on the base's device, ``init`` as :func:`~.delta.init_lora_pair` (``B = 0``)."""
        raise NotImplementedError

    use_dora = False  # DoRA: linear layers only (check_adaptable)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> WeightAdapter:
        keep = keep_adapter_precision(fn)
        if recurse:
            for child in self.children():
                child._apply(fn if child is self.base_layer else keep)
        super()._apply(keep, recurse=False)
        return self

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A (r, in), B (out, r))`` as matrices."""
        raise NotImplementedError

    def to_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """The stored weight as the ``(out, in)`` matrix the update is added to."""
        raise NotImplementedError

    def from_matrix(self, matrix: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_matrix`, back to ``weight``'s shape."""
        raise NotImplementedError

    def adapter_params(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if not name.startswith("base_layer.")]

    def base_weight(self) -> torch.Tensor:
        return cast(torch.Tensor, self.base_layer.weight)

    def merged_weight(self, base: torch.Tensor | None = None) -> torch.Tensor:
        """The fp32 weight, in the stored shape, equivalent to the adapted layer (differentiable in the adapters)."""
        weight = self.base_weight() if base is None else base
        if base is None and self.merged:
            return weight.float()
        lora_a, lora_b = self.factors()
        return self.from_matrix(merged_weight(self.to_matrix(weight), lora_a, lora_b, self.scaling), weight)

    def merged_parameters(self) -> dict[str, Callable[[], torch.Tensor]]:
        """The base layer's parameters that a merged export replaces, by name (:mod:`lightning_adapt.export.merged_state`)."""
        return {"weight": self.merged_weight}

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight in place; a no-op if already merged."""
        if not self.merged:
            _overwrite(self.base_weight(), self.merged_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` in place (``W = W' - ΔW``); a no-op if not merged."""
        if self.merged:
            weight = self.base_weight()
            delta = self.from_matrix(lora_delta(*self.factors(), self.scaling), weight)
            _overwrite(weight, weight.float() - delta.to(weight.device))
            self.merged = False

    def merged_module(self) -> nn.Module:
        """The base layer after :meth:`merge` (what :func:`~lightning_adapt.adapters.lora.merge_lora` puts back)."""
        self.merge()
        return self.base_layer

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}"


class LoRAConv(WeightAdapter):
    """``y = conv(x) + scaling · lora_B(lora_A(dropout(x)))``, as PEFT's ``lora.Conv2d``.

    ``lora_A`` is a convolution ``in → r`` with the layer's kernel, stride, padding, dilation and padding mode,
    ``lora_B`` a ``1×1`` convolution ``r → out``; ``ΔW = scaling · B.flatten(1) @ A.flatten(1)`` reshaped to the
    conv weight's shape. Grouped convolutions are refused (:func:`check_adaptable`).

    Args:
        base_layer: an ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` with ``groups=1``.
        r: rank; alpha: scale numerator; dropout: on the adapter input; init / use_rslora: as
            :class:`~lightning_adapt.adapters.lora.LoRALinear`.
    """

    base_layer: nn.Conv1d | nn.Conv2d | nn.Conv3d

    def add_factors(self, init: InitMethod) -> None:
        base, r = self.base_layer, self.r
        conv, ones = _CONVS[len(base.kernel_size)], (1,) * len(base.kernel_size)
        fp32 = {"bias": False, "device": base.weight.device, "dtype": torch.float32}
        self.lora_A = conv(
            base.in_channels, r, base.kernel_size, base.stride, base.padding, base.dilation,  # type: ignore[arg-type]
            padding_mode=base.padding_mode, **fp32,  # type: ignore[arg-type]
        )  # fmt: skip
        self.lora_B = conv(r, base.out_channels, ones, ones, **fp32)  # type: ignore[arg-type]
        init_lora_pair(self.lora_A.weight, self.lora_B.weight, init, r)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A.weight.flatten(1), self.lora_B.weight.flatten(1)

    def to_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.flatten(1)

    def from_matrix(self, matrix: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return matrix.reshape(weight.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = self.base_layer(x)
        if self.merged:
            return result
        update: torch.Tensor = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))
        return result + (update * self.scaling).to(result.dtype)


class LoRAEmbedding(WeightAdapter):
    """``y = emb(x) + scaling · F.embedding(x, Aᵀ) @ Bᵀ``, as PEFT's ``lora.Embedding``.

    ``lora_embedding_A`` ``(r, num_embeddings)`` starts at zero and ``lora_embedding_B`` ``(embedding_dim, r)``
    normal (PEFT's choice, whatever ``init``); the lookup keeps the layer's ``padding_idx`` (that row of ``A``
    gets no gradient) and ``scale_grad_by_freq``; an ``embed_scale`` of the layer (scaled word embeddings) scales
    the update too. ``W' = W + scaling · (B @ A)ᵀ``. Dropout does not apply (the input is indices), as in PEFT.
    A layer with ``max_norm`` is refused (:func:`check_adaptable`).
    """

    base_layer: nn.Embedding

    def add_factors(self, init: InitMethod) -> None:
        device, dims = self.base_layer.weight.device, (self.base_layer.num_embeddings, self.base_layer.embedding_dim)
        # PEFT draws both at random (on the CPU) before its init: drawing the same keeps seeded runs equal to PEFT's
        lora_a, lora_b = torch.randn(self.r, dims[0]), torch.randn(dims[1], self.r)
        self.lora_embedding_A = nn.Parameter(nn.init.zeros_(lora_a).to(device))
        self.lora_embedding_B = nn.Parameter(nn.init.normal_(lora_b).to(device))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_embedding_A, self.lora_embedding_B

    def to_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.T

    def from_matrix(self, matrix: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return matrix.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = self.base_layer(x)
        if self.merged:
            return result
        base = self.base_layer
        after_a = F.embedding(x, self.lora_embedding_A.T, base.padding_idx, scale_grad_by_freq=base.scale_grad_by_freq)
        update = (after_a @ self.lora_embedding_B.T) * self.scaling
        embed_scale = getattr(base, "embed_scale", None)
        if isinstance(embed_scale, torch.Tensor | float):
            update = update * (embed_scale.to(update.dtype) if isinstance(embed_scale, torch.Tensor) else embed_scale)
        return result + update.to(result.dtype)
