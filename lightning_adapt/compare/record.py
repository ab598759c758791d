"""The callback a ``compare`` run adds to each ``fit``: records what the comparison table needs as one JSON.

Enabled by the parent through ``--trainer.callbacks+=lightning_adapt.compare.record.CompareRecorder`` with the
output file in the environment variable :data:`~lightning_adapt.compare.files.RECORD_ENV`. Memory components are read from the run's own
:class:`~lightning_adapt.callbacks.memory_report.MemoryReportCallback` (its ``fit_end`` measurement), so the
table shows exactly what that callback measures; the record is written in ``teardown``, after every
callback's ``on_fit_end`` (the memory report's and the export's included).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch import nn
from typing_extensions import override

from lightning_adapt.adapters.inject import LoRASpec, logical_numel
from lightning_adapt.atomic import write_text_atomic
from lightning_adapt.callbacks._transform import transform_specs
from lightning_adapt.callbacks.memory_report import MemoryReportCallback
from lightning_adapt.callbacks.merge import MergeOnSaveCallback
from lightning_adapt.compare.files import RECORD_ENV, write_json
from lightning_adapt.layers import adapter_param_ids, layer_dims, quantized_layers
from lightning_adapt.quantize import QuantPlan
from lightning_adapt.resources import current_rss_bytes, peak_rss_bytes

__all__ = ["CompareRecorder"]

#: Resident memory when this module is imported: in a CLI run that is while the config is parsed, with the
#: interpreter, torch and Lightning loaded and no model built yet (the baseline of the CPU peak).
IMPORT_RSS = current_rss_bytes()
_PROGRESS_EVERY_S = 1.0


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The validation metrics (``val*`` keys) of ``metrics`` as floats."""
    out = {}
    for key, value in metrics.items():
        if key.startswith("val") and isinstance(value, (torch.Tensor, float, int)):
            out[key] = float(value)
    return out


def _batch_size(batch: Any) -> tuple[int, int | None]:
    """``(samples, tokens)`` of a batch: tokens from ``attention_mask`` (else ``input_ids``) when present; the
    examples of packed rows (``position_ids``, no ``attention_mask``) counted by their positions restarting at 0,
    not as one sample per row."""
    if isinstance(batch, Mapping):
        attention, ids = batch.get("attention_mask"), batch.get("input_ids")
        positions = batch.get("position_ids")
        if attention is None and isinstance(positions, torch.Tensor) and positions.ndim == 2:  # packed rows
            return int((positions == 0).sum()), positions.numel()
        if isinstance(attention, torch.Tensor) and attention.ndim == 2:
            return int(attention.shape[0]), int(attention.sum())
        if isinstance(ids, torch.Tensor) and ids.ndim == 2:
            return int(ids.shape[0]), ids.numel()
    first = batch[0] if isinstance(batch, (list, tuple)) and batch else batch
    return (int(first.shape[0]) if isinstance(first, torch.Tensor) and first.ndim else 1), None


def _params(module: nn.Module) -> dict[str, int]:
    """Trainable count and total, a packed 4-bit tensor counted as the weights it holds."""
    packed = {id(layer.weight): math.prod(layer_dims(layer)) for _, layer in quantized_layers(module)}
    total = sum(packed.get(id(p)) or logical_numel(p) for p in module.parameters())
    adapters = adapter_param_ids(module)
    return {
        "total": total,
        "trainable": sum(p.numel() for p in module.parameters() if p.requires_grad),
        "adapter": sum(p.numel() for p in module.parameters() if id(p) in adapters),
    }


def _method(specs: list[object]) -> tuple[str, dict[str, Any] | None]:
    """``(full | lora | qlora, LoRA settings)`` from the run's transform specs."""
    lora = next((spec for spec in specs if isinstance(spec, LoRASpec)), None)
    if lora is None:
        return "full", None
    quantized = any(isinstance(spec, QuantPlan) for spec in specs)
    settings = {"r": lora.r, "alpha": lora.alpha, "use_rslora": lora.use_rslora}
    return ("qlora" if quantized else "lora"), settings


def _files(trainer: L.Trainer) -> dict[str, str | None]:
    """The checkpoint and the exported adapter / merged model of the run (``None`` where there is none)."""
    ckpt = getattr(trainer.checkpoint_callback, "best_model_path", "") or ""
    merge = next((cb for cb in trainer.callbacks if isinstance(cb, MergeOnSaveCallback)), None)  # type: ignore[attr-defined]
    result = merge.result if merge is not None else None
    return {
        "checkpoint": ckpt or None,
        "adapter": str(result.adapter) if result is not None and result.adapter else None,
        "merged": str(result.merged) if result is not None and result.merged else None,
    }


class CompareRecorder(L.Callback):
    """Records step times, losses (with wall-clock), samples/tokens, validation metrics before and after,
    memory (from the run's ``MemoryReportCallback``), parameter counts and the files a run wrote.

    Example::

        LIGHTNING_ADAPT_COMPARE_RECORD=out/record.json lightning-adapt fit --config recipes/sentiment/lora.yaml \\
            --trainer.callbacks+=lightning_adapt.compare.record.CompareRecorder
    """

    def __init__(self, path: str | None = None) -> None:
        """
        Args:
            path: JSON file to write at the end of ``fit`` (default: the ``LIGHTNING_ADAPT_COMPARE_RECORD``
                environment variable; neither: nothing is written). A ``.progress`` file beside it holds
                ``step total`` while training, for the parent's progress display.
        """
        super().__init__()
        self.path = path or os.environ.get(RECORD_ENV)
        self.steps: list[dict[str, float | int | None]] = []
        self.before: dict[str, float] = {}
        self.after: dict[str, float] = {}
        self.after_step: int | None = None
        self._t0 = self._start = self._shown = 0.0
        self._size: tuple[int, int | None] = (0, None)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = time.perf_counter()

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # here the epoch-level metrics are logged; the ready tasks keep the sanity-check pass as ``baseline``
        metrics = _scalars(trainer.callback_metrics)
        if trainer.sanity_checking:
            baseline = getattr(pl_module, "baseline", None)
            self.before = metrics or (_scalars(baseline) if isinstance(baseline, Mapping) else {})
        else:
            self.after, self.after_step = metrics, trainer.global_step

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
        if self.path and trainer.is_global_zero and now - self._shown >= _PROGRESS_EVERY_S:
            self._shown = now
            total = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
            write_text_atomic(f"{self.path}.progress", f"{trainer.global_step} {total}\n")

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self.path and trainer.is_global_zero:  # the steps so far (a loss curve up to an out-of-memory)
            write_json(self.path, {"exception": repr(exception)[:500], "steps": self.steps})

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or not self.path or not trainer.is_global_zero:
            return
        write_json(self.path, self.record(trainer, pl_module))

    def record(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """Everything recorded, as one JSON-ready dict (the file's schema)."""
        report = next((cb for cb in trainer.callbacks if isinstance(cb, MemoryReportCallback)), None)  # type: ignore[attr-defined]
        stage = report.reports.get("fit_end", {}) if report is not None else {}
        estimate = report.estimate if report is not None else None
        method, lora = _method(transform_specs(trainer))
        device = next((p.device for p in pl_module.parameters()), torch.device("cpu"))
        cuda = device.type == "cuda"
        # the process's own peak (the report's CPU peak counts from the model's build; this table's from the imports)
        peak = int(torch.cuda.max_memory_allocated(device)) if cuda else peak_rss_bytes()
        return {
            "method": method,
            "lora": lora,
            "params": _params(pl_module),
            "memory": {component: values[0] for component, values in stage.items()},
            "memory_estimated": {component: values[1] for component, values in stage.items()},
            "memory_report": report is not None,
            "estimate": estimate.to_json() if estimate is not None else None,
            "no_estimate_reason": report.no_estimate_reason if report is not None else "no memory_report: in the run",
            "device": str(device),
            "peak": {
                "kind": "cuda_max_allocated" if cuda else "peak_rss",
                "bytes": peak,
                "baseline_bytes": 0 if cuda else IMPORT_RSS,
            },
            "steps": self.steps,
            "global_step": trainer.global_step,
            "metric_before": self.before,
            "metric_after": self.after,
            "metric_after_step": self.after_step,
            "files": _files(trainer),
            "log_dir": trainer.log_dir,
        }
