"""Initialisations that move part of the base weight into the adapter: PiSSA, OLoRA, LoftQ. Pure torch.

A plain LoRA starts at ``B = 0``. These start ``A (r, in)``, ``B (out, r)`` from the weight ``W (out, in)`` itself
and change the frozen base to what is left over, so that the model is (almost) unchanged at step 0::

    pissa   s·B·A = top-r SVD of W            base = W - s·B·A      (exact: base + s·B·A = W up to fp32 rounding)
    olora   B = Q[:, :r], A = R[:r] (W = QR)  base = W - s·B·A      (exact, as PiSSA)
    loftq   alternate Q = quant(W - s·B·A) and s·B·A = top-r SVD of W - deq(Q), ``iterations`` times:
            the base is quantized so that deq(Q) + s·B·A ≈ W, closer than deq(quant(W)) alone

(``s`` is the LoRA scaling ``alpha / r``.) The base is computed from the full-precision ``W`` of one layer at a
time, before that layer is quantized (:mod:`lightning_adapt.loading` while loading, ``QuantizeBaseCallback``
otherwise, through :mod:`.prepare`), or by :class:`~lightning_adapt.adapters.lora.LoRALinear` itself for a float base.

:func:`~lightning_adapt.adapters.lora.prepare_base` applies one to a layer in place.

Example:
    >>> w = torch.randn(8, 16)
    >>> init = pissa(w, r=4, scaling=2.0)
    >>> torch.allclose(init.base + 2.0 * init.lora_B @ init.lora_A, w, atol=1e-5)
    True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol, get_args

import torch
from torch import Tensor, nn

from lightning_adapt.adapters.delta import merged_weight
from lightning_adapt.errors import ConfigError

__all__ = [
    "CHANGED_BASE_INITS",
    "BaseInit",
    "BeforeQuantize",
    "ChangedBaseInit",
    "Roundtrip",
    "attach_before_quantize",
    "before_quantize",
    "compute_init",
    "dora_problem",
    "loftq",
    "merged_from_original",
    "olora",
    "original_factors",
    "pissa",
    "quantized_base_error",
    "remember_pair",
    "take_pair",
]

ChangedBaseInit = Literal["pissa", "olora", "loftq"]
CHANGED_BASE_INITS: tuple[str, ...] = get_args(ChangedBaseInit)

#: ``W -> deq(quant(W))``: the weight the quantized base will compute with, fp32, same shape.
Roundtrip = Callable[[torch.Tensor], torch.Tensor]

_PAIR = "_lightning_adapt_init_pair"
_HOOK = "_lightning_adapt_before_quantize"


@dataclass(frozen=True)
class BaseInit:
    """An initial adapter and the base it goes with, all fp32 on the weight's device.

    Attributes:
        lora_A: ``(r, in)``.
        lora_B: ``(out, r)``.
        base: ``(out, in)``: the new base weight, before any quantization.
    """

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    base: torch.Tensor


def _top_r(matrix: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``A (r, in)``, ``B (out, r)`` with ``scaling · B @ A`` the best rank-``r`` approximation of ``matrix``:
    ``√(σ/s)`` on each side of the top-``r`` singular triplets (PiSSA's and LoftQ's split)."""
    u, sigma, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = (sigma[:r] / scaling).sqrt()
    return (root[:, None] * vh[:r]).contiguous(), (u[:, :r] * root[None, :]).contiguous()


def pissa(weight: torch.Tensor, r: int, scaling: float) -> BaseInit:
    """PiSSA: the principal singular part of ``W`` trains, the rest is frozen.

    Args:
        weight: ``W (out, in)``, any float dtype; read, not modified.
        r: rank, ``<= min(out, in)``.
        scaling: the LoRA scaling ``s``.

    Returns:
        ``A = √(Σ_r/s)·V_rᵀ``, ``B = U_r·√(Σ_r/s)`` and ``base = W - s·B·A`` (fp32).
    """
    w = weight.detach().float()
    lora_a, lora_b = _top_r(w, r, scaling)
    return BaseInit(lora_a, lora_b, w - scaling * (lora_b @ lora_a))


def olora(weight: torch.Tensor, r: int, scaling: float) -> BaseInit:
    """OLoRA: ``W = Q R`` (reduced QR); ``B = Q[:, :r]`` (orthonormal columns), ``A = R[:r]``; ``base = W - s·B·A``.

    Args:
        weight: ``W (out, in)``; read, not modified.
        r: rank, ``<= min(out, in)``.
        scaling: the LoRA scaling ``s``.
    """
    w = weight.detach().float()
    q, upper = torch.linalg.qr(w)
    lora_b, lora_a = q[:, :r].contiguous(), upper[:r].contiguous()
    return BaseInit(lora_a, lora_b, w - scaling * (lora_b @ lora_a))


def loftq(weight: torch.Tensor, r: int, scaling: float, roundtrip: Roundtrip, iterations: int = 1) -> BaseInit:
    """LoftQ: a base to quantize and an adapter such that ``roundtrip(base) + s·B·A ≈ W``.

    Iteration ``t``: ``Q_t = roundtrip(W - s·B_{t-1}·A_{t-1})`` (``B_0 A_0 = 0``), then ``s·B_t·A_t`` = the best
    rank-``r`` approximation of ``W - Q_t``. The returned base is the last tensor handed to ``roundtrip``, so
    quantizing it again (deterministic) gives exactly the ``Q`` the adapter was fitted to. With one iteration
    ``‖W - Q - s·B·A‖ < ‖W - deq(quant(W))‖`` whenever the quantization error is not zero.

    Args:
        weight: ``W (out, in)``; read, not modified.
        r: rank, ``<= min(out, in)``.
        scaling: the LoRA scaling ``s``.
        roundtrip: ``W -> deq(quant(W))`` exactly as the base will be stored (e.g.
            :func:`lightning_adapt.quantize.quantization_roundtrip`).
        iterations: alternations, ``>= 1``.
    """
    w = weight.detach().float()
    target = w
    lora_a, lora_b, base = torch.empty(0), torch.empty(0), w
    for _ in range(iterations):
        base = target
        lora_a, lora_b = _top_r(w - roundtrip(base).float().to(w.device), r, scaling)
        target = w - scaling * (lora_b @ lora_a)
    return BaseInit(lora_a, lora_b, base)


def original_factors(
    lora_A: torch.Tensor, lora_B: torch.Tensor, lora_A0: torch.Tensor, lora_B0: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``A' = [A; A₀]`` ``(2r, in)``, ``B' = [B, -B₀]`` ``(out, 2r)``: ``B'A' = B A - B₀ A₀``, the update of a
    changed-base adapter relative to the original weight, as one rank-``2r`` LoRA with the same scaling."""
    lora_a = torch.cat([lora_A.detach().float(), lora_A0.float().to(lora_A.device)], dim=0)
    lora_b = torch.cat([lora_B.detach().float(), -lora_B0.float().to(lora_B.device)], dim=1)
    return lora_a, lora_b


def merged_from_original(
    original: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    lora_A0: torch.Tensor | None,
    lora_B0: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """``W + scaling·(B A - B₀ A₀)``, fp32 on ``W``'s device: an adapter merged into the original ``(out, in)`` weight
    ``W`` of a base that PiSSA / OLoRA / LoftQ changed to ``W - scaling·B₀A₀`` (plain ``W + scaling·B A`` without
    ``A₀``, ``B₀``). For PiSSA / OLoRA it equals the live ``base + scaling·B A`` up to rounding; for LoftQ it differs
    from ``deq(Q) + scaling·B A`` by LoftQ's remaining error ``W - deq(Q) - scaling·B₀A₀`` (as QLoRA's merge into the
    original differs from the quantized model by the quantization error)."""
    if lora_A0 is None or lora_B0 is None:
        return merged_weight(original, lora_A, lora_B, scaling)
    return merged_weight(original, *original_factors(lora_A, lora_B, lora_A0, lora_B0), scaling)


def dora_problem(init: object, use_dora: object) -> str | None:
    """Why ``init`` cannot go with DoRA (one line with the fix), else ``None``."""
    if use_dora is True and init in CHANGED_BASE_INITS:
        return (
            f"init={init!r} with use_dora=True: DoRA's magnitude is the row norm of the unchanged base, and "
            "PiSSA/OLoRA/LoftQ change the base. Fix: use_dora=False, or init='kaiming'."
        )
    return None


def quantized_base_error(method: str, kind: str) -> ConfigError:
    """The error for a layer (of type ``kind``) quantized before ``method`` could read its full-precision weight."""
    return ConfigError(
        f"init={method!r} needs the full-precision weight of this {kind}, but it was quantized before the adapter "
        "could see it. Fix: let QuantizeBaseCallback (quantize:) or lightning_adapt.loading.load_pretrained quantize "
        "it (they compute the init first), or init='kaiming'."
    )


def compute_init(
    method: str, weight: torch.Tensor, r: int, scaling: float, roundtrip: Roundtrip | None = None, iterations: int = 1
) -> BaseInit:
    """:func:`pissa`, :func:`olora` or :func:`loftq` by name (``roundtrip`` is LoftQ's, required there).

    Raises:
        ConfigError: an unknown ``method``, a rank above ``min(out, in)``, LoftQ without a quantized base.
    """
    if method not in CHANGED_BASE_INITS:
        raise ConfigError(f"init={method!r}: not one of {CHANGED_BASE_INITS}. Fix: init='pissa'.")
    if r > min(weight.shape):
        raise ConfigError(
            f"init={method!r}, r={r}: the rank must be <= min(out, in) = {min(weight.shape)} of a {tuple(weight.shape)} "
            "weight (its singular vectors / QR columns). Fix: a smaller r, or exclude_modules for that layer."
        )
    if method == "loftq":
        if roundtrip is None:
            raise ConfigError(
                "init='loftq' fits the adapter to the quantization error of the base, but this base is not quantized. "
                "Fix: add quantize: (QuantizeBaseCallback), or init='pissa' for a full-precision base."
            )
        return loftq(weight, r, scaling, roundtrip, iterations)
    return pissa(weight, r, scaling) if method == "pissa" else olora(weight, r, scaling)


def remember_pair(layer: nn.Module, pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Keep the initial ``(A, B)`` computed for ``layer`` on it (e.g. on the quantized layer that replaced the
    full-precision one) until :class:`~lightning_adapt.adapters.lora.LoRALinear` takes it."""
    layer.__dict__[_PAIR] = pair


def take_pair(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The ``(A, B)`` :func:`prepare_base` / :func:`remember_pair` left on ``layer`` (removed from it), or ``None``."""
    pair: tuple[torch.Tensor, torch.Tensor] | None = layer.__dict__.pop(_PAIR, None)
    return pair


class BeforeQuantize(Protocol):
    """Work on full-precision layers right before they are quantized (LoRA's PiSSA / OLoRA / LoftQ init, :class:`~
    lightning_adapt.adapters.prepare.ChangedBaseHook`): the layers, and a call per layer (given ``W -> deq(quant(W))``)
    that may change its weight in place and returns what to do to its quantized replacement."""

    def targets(self, model: nn.Module) -> set[str]: ...

    def __call__(self, layer: nn.Module, roundtrip: Callable[[Tensor], Tensor]) -> Callable[[nn.Module], None]: ...


def attach_before_quantize(module: nn.Module, hook: BeforeQuantize | None) -> None:
    """Ask whatever quantizes ``module``'s layers (:func:`~lightning_adapt.loading.load_pretrained`, ``QuantizeBaseCallback``) to run ``hook``
    on each of its :meth:`~BeforeQuantize.targets` first (``None`` withdraws it); set before ``configure_model``."""
    module.__dict__[_HOOK] = hook
    if hook is None:
        del module.__dict__[_HOOK]


def before_quantize(module: nn.Module) -> BeforeQuantize | None:
    """The hook attached by :func:`attach_before_quantize`, or ``None``."""
    return module.__dict__.get(_HOOK)  # type: ignore[no-any-return]
