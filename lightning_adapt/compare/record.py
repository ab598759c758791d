"""The callback a ``compare`` run adds to each ``fit``: records what the comparison table needs as one JSON.

Enabled by the parent through ``--trainer.callbacks+=lightning_adapt.compare.record.CompareRecorder`` with the
output file in the environment variable :data:`RECORD_ENV`. Memory components are read from the run's own
:class:`~lightning_adapt.callbacks.memory_report.MemoryReportCallback` (its ``fit_end`` measurement), so the
table shows exactly what that callback measures.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from typing_extensions import override

from lightning_adapt.callbacks.memory_report import MemoryReportCallback
from lightning_adapt.resources import peak_rss_bytes

__all__ = ["RECORD_ENV", "CompareRecorder", "current_rss_bytes", "write_json"]

RECORD_ENV = "LIGHTNING_ADAPT_COMPARE_RECORD"


def current_rss_bytes() -> int | None:
    """The process's resident set size now (Linux ``/proc/self/statm``), else ``None``."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def write_json(path: str | Path, payload: object) -> None:
    """Write ``payload`` as JSON atomically (temporary file in the same folder, then ``os.replace``)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".json", dir=target.parent)
    with os.fdopen(fd, "w") as handle:
        json.dump(payload, handle, indent=2)
    os.replace(tmp, target)


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {
        k: float(v) for k, v in metrics.items() if k.startswith("val") and isinstance(v, (torch.Tensor, float, int))
    }


def _batch_size(batch: Any) -> tuple[int, int | None]:
    """``(samples, tokens)`` of a batch: tokens from ``attention_mask`` (else ``input_ids``) when present."""
    if isinstance(batch, Mapping):
        attention, ids = batch.get("attention_mask"), batch.get("input_ids")
        if isinstance(attention, torch.Tensor) and attention.ndim == 2:
            return int(attention.shape[0]), int(attention.sum())
        if isinstance(ids, torch.Tensor) and ids.ndim == 2:
            return int(ids.shape[0]), ids.numel()
    first = batch[0] if isinstance(batch, (list, tuple)) and batch else batch
    return (int(first.shape[0]) if isinstance(first, torch.Tensor) and first.ndim else 1), None


class CompareRecorder(L.Callback):
    """Step times, losses (with wall-clock), samples/tokens, validation metrics before/after, memory."""

    def __init__(self) -> None:
        super().__init__()
        self.path = os.environ.get(RECORD_ENV)
        self.baseline_rss = current_rss_bytes()  # interpreter + libraries, before the model is built
        self.steps: list[dict[str, float | int | None]] = []
        self.before: dict[str, float] = {}
        self.after: dict[str, float] = {}
        self._t0 = self._start = 0.0
        self._size: tuple[int, int | None] = (0, None)

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = time.perf_counter()

    @override
    def on_sanity_check_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.before = _scalars(trainer.callback_metrics)

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.after = _scalars(trainer.callback_metrics)

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._size = _batch_size(batch)
        self._start = time.perf_counter()

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        self.steps.append({
            "step": trainer.global_step,
            "loss": float(loss) if isinstance(loss, torch.Tensor) else None,
            "time": now - self._t0,
            "step_time": now - self._start,
            "samples": self._size[0],
            "tokens": self._size[1],
        })  # fmt: skip

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.path or not trainer.is_global_zero:
            return
        report = next((cb for cb in getattr(trainer, "callbacks", []) if isinstance(cb, MemoryReportCallback)), None)
        stage = report.reports.get("fit_end", {}) if report is not None else {}
        device = next((p.device for p in pl_module.parameters()), torch.device("cpu"))
        write_json(self.path, {
            "memory": {component: values[0] for component, values in stage.items()},
            "memory_report": report is not None,
            "total_params": sum(p.numel() for p in pl_module.parameters()),
            "trainable_params": sum(p.numel() for p in pl_module.parameters() if p.requires_grad),
            "peak_kind": "cuda_max_allocated" if device.type == "cuda" else "peak_rss",
            "peak_bytes": int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else peak_rss_bytes(),
            "baseline_rss_bytes": self.baseline_rss,
            "steps": self.steps,
            "metric_before": self.before,
            "metric_after": self.after,
            "log_dir": trainer.log_dir,
            "checkpoint": getattr(trainer.checkpoint_callback, "best_model_path", None),
        })  # fmt: skip
