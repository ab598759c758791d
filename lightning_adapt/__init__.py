"""lightning-adapt: full fine-tuning, LoRA and QLoRA for any LightningModule through configuration.

Callbacks (add them to any ``Trainer``, or use the recipe keys of the ``lightning-adapt`` CLI):

* :class:`QuantizeBaseCallback` (``quantize:``): NF4 / FP4 / int8 frozen base through bitsandbytes.
* :class:`LoRAInjectionCallback` (``lora:``): LoRA / rsLoRA / DoRA adapters on the chosen layers.
* :class:`PagedOptimizerPlugin` (``paged_optimizer:``): bitsandbytes (paged, 8-bit) optimizers.
* :class:`MergeOnSaveCallback` (``merge:``): the PEFT-format adapter and the merged model as safetensors.
* :class:`FitCheckCallback` (``fit_check: error | warn | off``, on by default in the CLI): before the base is read,
  will the run fit its device?
* :class:`MemoryReportCallback` (``memory_report:``): measured memory beside the estimator's prediction.
* :class:`PredictionWriter` (``predictions:``): ``predict``'s outputs as JSON Lines plus a short table.
* :class:`NonFiniteGuardCallback` (``guard:``): stop, or skip the step, on a NaN/Inf loss or gradient.
* :class:`ExactResumeCallback` (``exact_resume:``): random states in every checkpoint, for your own loaders
  (the ready DataModules' :class:`~lightning_adapt.data.ResumableDataLoader` keeps them itself).

Plugin: :class:`AtomicCheckpointIO` (checkpoints a kill cannot leave half-written; installed by the CLI and
the transform callbacks, ``plugins=[AtomicCheckpointIO()]`` for a plain ``Trainer``).

The package is layered (``docs/architecture.md``): :mod:`~lightning_adapt.errors` and
:mod:`~lightning_adapt.layers` at the bottom; :mod:`~lightning_adapt.adapters`,
:mod:`~lightning_adapt.quantize`, :mod:`~lightning_adapt.optim` (plain torch); :mod:`~lightning_adapt.export`
and :mod:`~lightning_adapt.memory`; the thin Lightning :mod:`~lightning_adapt.callbacks`; the CLI, tasks and data.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_adapt.adapters.lora import LoRALinear, merge_lora
    from lightning_adapt.adapters.switch import adapters_disabled
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
    from lightning_adapt.errors import ConfigError

__version__ = "0.1.0"

#: public name -> its module, imported on first use (PEP 562): ``lightning-adapt estimate`` and the math
#: modules (``lightning_adapt.memory``, ``.adapters``...) load without Lightning
_EXPORTS: dict[str, str] = {
    "AtomicCheckpointIO": "lightning_adapt.callbacks.atomic_checkpoint",
    "ConfigError": "lightning_adapt.errors",
    "ExactResumeCallback": "lightning_adapt.callbacks.exact_resume",
    "FitCheckCallback": "lightning_adapt.callbacks.fit_check",
    "LoRAInjectionCallback": "lightning_adapt.callbacks.lora",
    "LoRALinear": "lightning_adapt.adapters.lora",
    "MemoryReportCallback": "lightning_adapt.callbacks.memory_report",
    "MergeOnSaveCallback": "lightning_adapt.callbacks.merge",
    "NonFiniteGuardCallback": "lightning_adapt.callbacks.nonfinite_guard",
    "PagedOptimizerPlugin": "lightning_adapt.callbacks.paged_optimizer",
    "PredictionWriter": "lightning_adapt.callbacks.predictions",
    "QuantizeBaseCallback": "lightning_adapt.callbacks.quantize",
    "adapters_disabled": "lightning_adapt.adapters.switch",
    "merge_lora": "lightning_adapt.adapters.lora",
}

__all__ = [
    "AtomicCheckpointIO",
    "ConfigError",
    "ExactResumeCallback",
    "FitCheckCallback",
    "LoRAInjectionCallback",
    "LoRALinear",
    "MemoryReportCallback",
    "MergeOnSaveCallback",
    "NonFiniteGuardCallback",
    "PagedOptimizerPlugin",
    "PredictionWriter",
    "QuantizeBaseCallback",
    "__version__",
    "adapters_disabled",
    "merge_lora",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_adapt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
