"""Thin Lightning callbacks over the plain-torch math modules; one public class per file.

:class:`~lightning_adapt.callbacks._transform.ModelTransformCallback` is the base of those that change the
model's structure (quantize, lora); the others find them through it.
"""

from lightning_adapt.callbacks.atomic_checkpoint import AtomicCheckpointIO
from lightning_adapt.callbacks.exact_resume import ExactResumeCallback
from lightning_adapt.callbacks.fit_check import FitCheckCallback
from lightning_adapt.callbacks.lora import LoRAInjectionCallback
from lightning_adapt.callbacks.memory_report import MemoryReportCallback
from lightning_adapt.callbacks.merge import MergeOnSaveCallback
from lightning_adapt.callbacks.nonfinite_guard import NonFiniteGuardCallback
from lightning_adapt.callbacks.paged_optimizer import PagedOptimizerPlugin
from lightning_adapt.callbacks.predictions import PredictionWriter
from lightning_adapt.callbacks.quantize import QuantizeBaseCallback

__all__ = [
    "AtomicCheckpointIO",
    "ExactResumeCallback",
    "FitCheckCallback",
    "LoRAInjectionCallback",
    "MemoryReportCallback",
    "MergeOnSaveCallback",
    "NonFiniteGuardCallback",
    "PagedOptimizerPlugin",
    "PredictionWriter",
    "QuantizeBaseCallback",
]
