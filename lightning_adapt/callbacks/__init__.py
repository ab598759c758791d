"""Thin Lightning callbacks over the plain-torch math modules; one public class per file."""

from lightning_adapt.callbacks.lora import LoRAInjectionCallback
from lightning_adapt.callbacks.memory_report import MemoryReportCallback
from lightning_adapt.callbacks.merge import MergeOnSaveCallback
from lightning_adapt.callbacks.quantize import QuantizeBaseCallback

__all__ = ["LoRAInjectionCallback", "MemoryReportCallback", "MergeOnSaveCallback", "QuantizeBaseCallback"]
