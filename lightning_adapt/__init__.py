"""lightning-adapt: full fine-tuning, LoRA and QLoRA for any LightningModule through configuration.

Callbacks (add them to any ``Trainer``, or use the recipe keys of the ``lightning-adapt`` CLI):

* :class:`QuantizeBaseCallback` (``quantize:``): NF4 / FP4 / int8 frozen base through bitsandbytes.
* :class:`LoRAInjectionCallback` (``lora:``): LoRA / rsLoRA / DoRA adapters on the chosen layers.
* :class:`PagedOptimizerPlugin` (``paged_optimizer:``): bitsandbytes (paged, 8-bit) optimizers.
* :class:`MergeOnSaveCallback` (``merge:``): the PEFT-format adapter and the merged model as safetensors.
* :class:`MemoryReportCallback` (``memory_report:``): measured memory beside the estimator's prediction.

The math lives in plain-torch modules: :mod:`lightning_adapt.lora`, :mod:`lightning_adapt.quant`,
:mod:`lightning_adapt.targeting`, :mod:`lightning_adapt.memory`.
"""

from lightning_adapt.callbacks.lora import LoRAInjectionCallback
from lightning_adapt.callbacks.memory_report import MemoryReportCallback
from lightning_adapt.callbacks.merge import MergeOnSaveCallback
from lightning_adapt.callbacks.quantize import QuantizeBaseCallback
from lightning_adapt.lora import LoRALinear, merge_lora
from lightning_adapt.plugins.paged_optimizer import PagedOptimizerPlugin

__version__ = "0.1.0"

__all__ = [
    "LoRAInjectionCallback",
    "LoRALinear",
    "MemoryReportCallback",
    "MergeOnSaveCallback",
    "PagedOptimizerPlugin",
    "QuantizeBaseCallback",
    "__version__",
    "merge_lora",
]
