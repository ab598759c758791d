"""Rank diagnostics of trained LoRA updates: singular values of ``ΔW = scale · B A``, effective rank, suggested ``r``.

Pure torch. The singular values of ``B A`` (``B``: ``out × r``, ``A``: ``r × in``) are computed from two thin QR
factorisations, ``B = Q_B R_B`` and ``Aᵀ = Q_A R_A``: ``B A = Q_B (R_B R_Aᵀ) Q_Aᵀ`` with orthonormal ``Q``s, so
the singular values of the ``r × r`` core ``R_B R_Aᵀ`` are exactly those of ``ΔW`` (no ``out × in`` matrix is
formed). Work is in float64, so an update of exact rank ``k`` has ``k`` singular values above round-off.

The *effective rank at energy e* is the smallest ``k`` whose ``k`` largest singular values carry at least a
fraction ``e`` of ``Σ σ²`` (the squared Frobenius norm of the update). The suggested ``r`` for a layer type is
the largest 99 %-effective rank over the layers of that type, rounded up to a power of two.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from lightning_adapt.errors import SETTING, ConfigError

__all__ = [
    "LayerSpectrum",
    "RankSuggestion",
    "effective_rank",
    "layer_type",
    "numerical_rank",
    "spectra_from_state",
    "suggest_ranks",
    "update_singular_values",
]

_A_SUFFIX = ".lora_A.weight"
_B_SUFFIX = ".lora_B.weight"
ENERGIES = (0.9, 0.99)


def update_singular_values(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """The ``r`` singular values (descending, float64) of ``scaling · lora_B @ lora_A``."""
    if lora_A.ndim != 2 or lora_B.ndim != 2 or lora_B.shape[1] != lora_A.shape[0]:
        raise ValueError(f"LoRA factors do not chain: A {tuple(lora_A.shape)}, B {tuple(lora_B.shape)}")
    r_b = torch.linalg.qr(lora_B.detach().to(torch.float64, copy=True), mode="r").R
    r_a = torch.linalg.qr(lora_A.detach().to(torch.float64, copy=True).T, mode="r").R
    values: torch.Tensor = torch.linalg.svdvals(r_b @ r_a.T) * abs(scaling)
    return values


def effective_rank(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest ``k`` whose ``k`` largest singular values carry at least ``energy`` of ``Σ σ²``; 0 for a zero update."""
    if not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    power = torch.sort(singular_values.to(torch.float64) ** 2, descending=True).values
    total = float(power.sum())
    if total == 0:
        return 0
    cumulative = torch.cumsum(power, 0) / total
    # A relative slack of 1e-12 keeps round-off from asking for one more (zero) singular value.
    return int(torch.searchsorted(cumulative, torch.tensor(energy - 1e-12, dtype=torch.float64)).item()) + 1


def numerical_rank(singular_values: torch.Tensor, rtol: float = 1e-10) -> int:
    """Number of singular values above ``rtol`` times the largest (the rank up to round-off)."""
    if singular_values.numel() == 0 or float(singular_values.max()) == 0:
        return 0
    return int((singular_values > rtol * singular_values.max()).sum())


_INDEX = re.compile(r"\.\d+\.")


def layer_type(name: str) -> str:
    """The part of a layer name after its last block index (``model.layers.3.self_attn.q_proj`` → ``self_attn.q_proj``)."""
    matches = list(_INDEX.finditer(f".{name}."))
    if not matches:
        return name.rsplit(".", 1)[-1]
    return f".{name}."[matches[-1].end() : -1] or name


@dataclass(frozen=True)
class LayerSpectrum:
    """The spectrum of one adapted layer's update."""

    name: str
    r: int
    singular_values: tuple[float, ...]

    @property
    def layer_type(self) -> str:
        return layer_type(self.name)

    def effective_rank(self, energy: float) -> int:
        return effective_rank(torch.tensor(self.singular_values, dtype=torch.float64), energy)

    @property
    def numerical_rank(self) -> int:
        return numerical_rank(torch.tensor(self.singular_values, dtype=torch.float64))

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "layer_type": self.layer_type,
            "r": self.r,
            "singular_values": list(self.singular_values),
            "numerical_rank": self.numerical_rank,
            **{f"effective_rank_{round(e * 100)}": self.effective_rank(e) for e in ENERGIES},
        }


def _scaling(r: int, alpha: float, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def spectra_from_state(state: Mapping[str, object], alpha: float, use_rslora: bool = False) -> list[LayerSpectrum]:
    """One :class:`LayerSpectrum` per ``<layer>.lora_A.weight`` / ``<layer>.lora_B.weight`` pair of ``state``.

    Raises:
        ConfigError: ``state`` holds no LoRA pair (setting ``ckpt_path``).
    """
    spectra = []
    for key in sorted(state):
        if not key.endswith(_A_SUFFIX):
            continue
        name = key.removesuffix(_A_SUFFIX)
        lora_A, lora_B = state[key], state.get(name + _B_SUFFIX)
        if not isinstance(lora_A, torch.Tensor) or not isinstance(lora_B, torch.Tensor):
            continue
        r = int(lora_A.shape[0])
        values = update_singular_values(lora_A, lora_B, _scaling(r, alpha, use_rslora))
        spectra.append(LayerSpectrum(name, r, tuple(float(v) for v in values)))
    if not spectra:
        raise ConfigError(
            f"{SETTING}: holds no LoRA adapter weights (no '*{_A_SUFFIX}' / '*{_B_SUFFIX}' pair).", setting="ckpt_path"
        )
    return spectra


@dataclass(frozen=True)
class RankSuggestion:
    """What the layers of one type used of their rank, and the ``r`` that would keep ``energy`` of the update."""

    layer_type: str
    r: int
    used_rank: int
    suggested_r: int
    energy: float
    layers: int

    def sentence(self) -> str:
        pct = f"{self.energy * 100:g}%"
        verdict = "keep" if self.suggested_r >= self.r else f"r={self.suggested_r} would keep {pct} of the update"
        head = f"r={self.r} on {self.layer_type} used an effective rank of {self.used_rank} ({pct} energy, max over {self.layers} layers); "
        return head + (f"r={self.r} is needed to keep {pct} of the update" if verdict == "keep" else verdict)


def suggest_ranks(spectra: list[LayerSpectrum], energy: float = 0.99) -> list[RankSuggestion]:
    """Per layer type: the largest effective rank at ``energy`` and that rank rounded up to a power of two."""
    by_type: dict[str, list[LayerSpectrum]] = {}
    for spectrum in spectra:
        by_type.setdefault(spectrum.layer_type, []).append(spectrum)
    suggestions = []
    for kind, group in by_type.items():
        used = max(s.effective_rank(energy) for s in group)
        r = max(s.r for s in group)
        suggested = min(r, 1 << max(used - 1, 0).bit_length())
        suggestions.append(RankSuggestion(kind, r, used, suggested, energy, len(group)))
    return suggestions
