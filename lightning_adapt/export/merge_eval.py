"""Which QLoRA merge to ship, measured on the validation data: :class:`MergeEvaluation`. Pure Python + torch.

A QLoRA model trains ``y = deq(Q(W))·x + scale·B A x``; its export merges the adapter either into the original
weights, ``W + scale·BA`` (``merge_base='original'``), or into the dequantized ones, ``deq(Q(W)) + scale·BA``
(``'dequantized'``: the trained function up to rounding). The weight difference between the two does not say
which validates better, so the export measures the trained model and each merge: the live model with its
quantized layers swapped for dense merged ones (:func:`~lightning_adapt.export.report.dense_layers` of
:func:`~lightning_adapt.export.report.merged_weights`, one merge at a time), validated by Lightning's loop
(``callbacks/_merge_eval.py``). :class:`MergeEvaluation` holds the metrics and recommends a merge by the
monitored metric. Imports nothing else of ours (the export's result holds one).

Example:
    >>> MergeEvaluation({"trained": {"val_loss": 2.22}, "original": {"val_loss": 2.13},
    ...                  "dequantized": {"val_loss": 2.22}}).recommended()
    'original'
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

__all__ = ["MergeEvaluation", "available_bytes"]

Mode = Literal["min", "max"]
#: How each evaluated model is named in the report.
LABELS = {
    "trained": "trained (quantized base + adapters)",
    "original": "merge_base=original",
    "dequantized": "merge_base=dequantized",
}


def available_bytes(device: torch.device) -> int:
    """Memory free for new tensors on ``device``: CUDA's free memory plus PyTorch's unused cache; for the CPU
    ``MemAvailable`` of ``/proc/meminfo``; 0 when unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    with contextlib.suppress(OSError, StopIteration, ValueError, IndexError):
        lines = Path("/proc/meminfo").read_text().splitlines()
        return 1024 * int(next(line for line in lines if line.startswith("MemAvailable:")).split()[1])
    return 0


def _scope(batches: int | float | None) -> str:
    if isinstance(batches, int):
        return f"{batches} batches"
    return "all batches" if batches is None or batches >= 1 else f"{batches:.0%} of the batches"


@dataclass(frozen=True)
class MergeEvaluation:
    """The validation metrics of the trained model and of each merge, and the merge they recommend.

    Args:
        metrics: ``{"trained" | "original" | "dequantized": {metric: value}}``, as the module logs them.
        monitor: the metric that decides (the run's ``ModelCheckpoint`` / ``EarlyStopping`` monitor, else
            ``val_loss``).
        mode: ``min`` (a loss, a perplexity) or ``max`` (an accuracy) is better.
        merge_base: the merge this export wrote.
        batches: how many validation batches each model saw (``None``: all).
        notes: why a model was not evaluated (e.g. the source weights are missing, or too little memory).
    """

    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    monitor: str = "val_loss"
    mode: Mode = "min"
    merge_base: str = "original"
    batches: int | float | None = None
    notes: tuple[str, ...] = ()

    def recommended(self) -> str | None:
        """The merge whose ``monitor`` is better (``original`` on a tie); ``None`` unless both were measured."""
        values = {k: self.metrics.get(k, {}).get(self.monitor) for k in ("original", "dequantized")}
        original, dequantized = values["original"], values["dequantized"]
        if original is None or dequantized is None:
            return None
        better = dequantized < original if self.mode == "min" else dequantized > original
        return "dequantized" if better else "original"

    def relative_gap(self, variant: str = "dequantized") -> float | None:
        """Max ``|m_variant - m_trained| / |m_trained|`` over the metrics both logged (``None``: not both)."""
        trained, other = self.metrics.get("trained", {}), self.metrics.get(variant, {})
        gaps = [abs(other[k] - v) / max(abs(v), 1e-12) for k, v in trained.items() if k in other]
        return max(gaps) if gaps else None

    def format(self) -> str:
        """Lines for the export summary: one per model, the recommendation, and the export's own choice."""
        if not self.metrics:
            return "merge evaluation skipped: " + "; ".join(self.notes)
        better = "lower" if self.mode == "min" else "higher"
        lines = [
            f"merge evaluation on the validation data ({_scope(self.batches)}; {self.monitor}, {better} is better):"
        ]
        best = self.recommended()
        for variant, metrics in self.metrics.items():
            values = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            gap = self.relative_gap(variant) if variant != "trained" else None
            extra = f"  (vs trained: {gap:.1e} relative)" if variant == "dequantized" and gap is not None else ""
            mark = "  <- recommended" if variant == best else ""
            lines.append(f"  {LABELS.get(variant, variant):<36} {values}{extra}{mark}")
        lines += [f"  note: {note}" for note in self.notes]
        if best is None:
            lines.append(f"  no recommendation: {self.monitor} was not measured for both merges")
        elif best == self.merge_base:
            lines.append(f"  this export: merge_base={self.merge_base} (the recommended one)")
        else:
            lines.append(
                f"  this export: merge_base={self.merge_base}; {best} validates better. To ship it: merge_base: "
                f"{best} in the recipe's merge:, or lightning-adapt export ... --merge_base {best}"
            )
        return "\n".join(lines)
