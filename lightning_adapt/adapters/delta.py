"""The LoRA update shared by every layer kind: arguments, scaling, ``ΔW``, the merge, fp32 adapters. Pure torch.

The bottom of :mod:`lightning_adapt.adapters` (it imports only :mod:`lightning_adapt.errors`), so that the
wrappers of every kind (:mod:`.lora`, :mod:`.kinds`, :mod:`.attention`) and the exports share one merge,
:func:`merged_weight`, and find each other through one protocol, :class:`Foldable`, without long import chains.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import nn

__all__ = [
    "Foldable",
    "InitMethod",
    "LoRAInit",
    "init_lora_pair",
    "keep_adapter_precision",
    "lora_arg_problems",
    "lora_delta",
    "lora_layers",
    "lora_scaling",
    "merged_weight",
    "parameter_problem",
]

#: Random initialisations of ``A`` (``B = 0``), every layer kind.
InitMethod = Literal["kaiming", "gaussian"]
#: Linear layers also start from the weight itself (:mod:`lightning_adapt.adapters.init`: the base changes).
LoRAInit = Literal["kaiming", "gaussian", "pissa", "olora", "loftq"]
_INITS: tuple[str, ...] = ("kaiming", "gaussian", "pissa", "olora", "loftq")


def lora_arg_problems(r: object, alpha: object, dropout: object, init: object = "kaiming") -> list[str]:
    """Every invalid LoRA argument as one line (argument, value, allowed, fix); empty when all are valid."""
    problems: list[str] = []
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        problems.append(f"r={r!r}: the rank must be an int >= 1 (typical 8-64). Fix: r=8.")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha > 0:
        problems.append(f"alpha={alpha!r}: must be a number > 0 (commonly 2*r). Fix: alpha=16.")
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        problems.append(f"dropout={dropout!r}: must satisfy 0 <= dropout < 1. Fix: dropout=0.05, or 0.0 to disable it.")
    if init not in _INITS:
        problems.append(
            f"init={init!r}: must be one of {_INITS} (pissa/olora/loftq start from the weight's SVD / QR / "
            "quantization error); Fix: init='kaiming' (PEFT's default)."
        )
    return problems


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    """``alpha / r``, or ``alpha / sqrt(r)`` with rank-stabilised LoRA."""
    return float(alpha) / (math.sqrt(r) if use_rslora else r)


def lora_delta(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """``scaling · B @ A``: ``(out, r) @ (r, in)`` in fp32, on ``B``'s device."""
    delta: torch.Tensor = lora_B.float() @ lora_A.float()
    return scaling * delta


def merged_weight(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    magnitude: torch.Tensor | None = None,
) -> torch.Tensor:
    """The merged ``(out, in)`` fp32 weight, on ``weight``'s device; nothing is modified in place::

        W' = W + ΔW                         ΔW = scaling · B @ A
        W' = m · (W + ΔW) / ‖W + ΔW‖_row    DoRA (the norm is a constant for the gradient, as in PEFT)

    The one merge used everywhere (every wrapper's ``merged_weight``, the in-memory and the streaming
    export), so every path gives the same bits. Peak: ``W`` in fp32, ``ΔW`` and the result. Differentiable
    in ``A`` and ``B`` (the attention wrapper computes its forward with it).
    """
    weight = weight.float()
    merged = weight + lora_delta(lora_A, lora_B, scaling).to(weight.device)
    if magnitude is None:
        return merged
    scale = magnitude.float().to(weight.device) / torch.linalg.vector_norm(merged.detach(), dim=1)
    result: torch.Tensor = scale.view(-1, 1) * merged
    return result


def parameter_problem(name: str, param: object) -> str | None:
    """Why the parameter ``name`` cannot be adapted (one line with the fix), else ``None``."""
    if not isinstance(param, nn.Parameter) or not param.is_floating_point():
        return f"{name} is not a floating nn.Parameter (a quantized weight?); target its module or leave it out"
    if param.dim() not in (2, 3):
        return f"{name} has shape {tuple(param.shape)}: only 2-D (out, in) and 3-D (experts, out, in) are adapted"
    return None


def init_lora_pair(lora_A: torch.Tensor, lora_B: torch.Tensor, init: InitMethod, r: int) -> None:
    """PEFT's initialisation: ``A`` kaiming-uniform (``a=√5``) or ``N(0, 1/r)``, ``B = 0`` (identity at start)."""
    with torch.no_grad():
        if init == "kaiming":
            nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
        else:
            nn.init.normal_(lora_A, std=1 / r)
        nn.init.zeros_(lora_B)


def keep_adapter_precision(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn`` for adapter tensors in ``_apply``: they refuse down-casts (a bf16-true plugin's module.to(bf16)) and
    only move device, as PEFT keeps adapters in fp32 (bf16 adapters lose small updates); the rest applies."""

    def keep_precision(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            probe = fn(torch.zeros((), dtype=t.dtype, device=t.device))
            if probe.is_floating_point() and probe.dtype.itemsize < t.dtype.itemsize:
                return t.to(device=probe.device)
        return fn(t)

    return keep_precision


@runtime_checkable
class Foldable(Protocol):
    """A LoRA wrapper of any layer kind: :meth:`merged_module` is its base holding the merged weights."""

    def merged_module(self) -> nn.Module: ...


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(dotted name, wrapper)`` of every LoRA wrapper (:class:`Foldable`) of any kind in ``model``, outermost
    only (the ``out_proj`` LoRALinear of an adapted attention belongs to the attention's wrapper)."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if (
            isinstance(module, nn.Module)
            and isinstance(module, Foldable)
            and not any(name.startswith(outer + ".") for outer, _ in found)
        ):
            found.append((name, module))
    return found
