"""FSDP1 (Lightning's ``FSDPStrategy``, CUDA only) for LoRA and QLoRA: the wrap policy and the 4-bit storage.

FSDP1 flattens the parameters of each wrapped unit into one ``FlatParameter``, which needs one float dtype per
unit. Two things follow, both handled here before the model is built:

* **4-bit storage.** The packed codes must live in a float tensor whose dtype equals the mixed-precision
  ``param_dtype`` (``bf16-true`` / ``bf16-mixed``: bf16): FSDP casts every flat parameter to that dtype for
  compute, and a cast of packed bytes into another dtype turns them into random weights (bitsandbytes reads the
  nibbles whatever the storage dtype). :func:`fsdp1_quant_storage` picks that dtype when the recipe left the
  default ``uint8`` and refuses a different float one; int8 codes cannot be flattened at all.
* **Wrap policy.** Adapters stay fp32 under ``bf16-true`` (as PEFT keeps them), so they cannot share a unit with
  the bf16 base. :func:`fsdp1_wrap_policy` gives each repeated block its own unit, and each module that owns
  trainable parameters (``lora_A``, ``lora_B``, a DoRA layer's magnitude with its base beside it, a module
  trained fully) a unit of its own — the layout PEFT's ``fsdp_auto_wrap_policy`` uses.

Lightning already refuses ``FSDPStrategy`` without CUDA, so these paths run only on GPUs; on CPU, FSDP2 through
``ModelParallelStrategy`` + ``shard:`` is the tested path (``docs/distributed.md``).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn
from torch.distributed.fsdp import MixedPrecision
from torch.distributed.fsdp.wrap import CustomPolicy

from lightning_adapt.errors import ConfigError

__all__ = ["fsdp1_param_dtype", "fsdp1_quant_storage", "fsdp1_wrap_policy", "install_fsdp1_policy"]

_PRECISION_DTYPE = {
    "bf16-true": torch.bfloat16,
    "bf16-mixed": torch.bfloat16,
    "16-true": torch.float16,
    "16-mixed": torch.float16,
    "32-true": torch.float32,
}


def fsdp1_param_dtype(strategy: FSDPStrategy, precision: str) -> torch.dtype:
    """The dtype FSDP1 gives flat parameters for compute: the strategy's ``mixed_precision`` if set, else the
    one Lightning derives from the trainer's precision."""
    config = strategy.mixed_precision
    if config is not None and config.param_dtype is not None:
        return config.param_dtype
    if precision not in _PRECISION_DTYPE:
        raise ConfigError(
            f"trainer.precision={precision!r} with strategy fsdp and a 4-bit base: allowed "
            f"{sorted(_PRECISION_DTYPE)}. Fix: trainer.precision: bf16-true."
        )
    return _PRECISION_DTYPE[precision]


def fsdp1_quant_storage(mode: str, storage: torch.dtype, param_dtype: torch.dtype) -> torch.dtype:
    """The storage dtype of the packed 4-bit codes under FSDP1: ``param_dtype`` (chosen when ``storage`` is the
    default ``uint8``; a matching explicit value is kept).

    Raises:
        ConfigError: int8 (its codes cannot be flattened), or an explicit float storage other than ``param_dtype``.
    """
    if mode == "int8":
        raise ConfigError(
            "quantize.mode='int8' with strategy fsdp (FSDP1): int8 codes cannot be flattened into FSDP's float "
            "FlatParameter. Fix: mode nf4 (its codes are stored in the compute dtype), or strategy ddp."
        )
    if storage in (torch.uint8, param_dtype):
        return param_dtype
    raise ConfigError(
        f"quantize.quant_storage={storage} with strategy fsdp whose parameters compute in {param_dtype}: FSDP1 would "
        "cast the packed 4-bit codes into another dtype and turn them into random weights. Fix: drop "
        f"quant_storage (it follows the precision), or set it to {str(param_dtype).removeprefix('torch.')}."
    )


def _block_classes(root: nn.Module) -> set[type[nn.Module]]:
    """The class of the children of the largest ``nn.ModuleList`` whose children share one class."""
    lists = [m for m in root.modules() if isinstance(m, nn.ModuleList) and len(m) and len({type(c) for c in m}) == 1]
    if not lists:
        return set()
    return {type(max(lists, key=len)[0])}


def fsdp1_wrap_policy(root: nn.Module) -> CustomPolicy:
    """FSDP1 units for ``root`` as adapted when FSDP wraps it: one per repeated block, one per module owning
    trainable parameters, and the children of such a module that hold frozen ones (a DoRA layer's base).

    A unit of trainable parameters computes in their own dtype (fp32 adapters stay fp32, as without FSDP), the
    others in the strategy's mixed precision. The units are decided on the first call, i.e. when FSDP wraps the
    model (after quantization and injection).
    """
    units: dict[int, bool | dict[str, Any]] = {}

    def decide(module: nn.Module) -> bool | dict[str, Any]:
        if not units:
            units.update(_units(root))
            units[-1] = False  # decided, even where nothing matched
        return units.get(id(module), False)

    return CustomPolicy(decide)


def _units(root: nn.Module) -> dict[int, bool | dict[str, Any]]:
    blocks = tuple(_block_classes(root))
    units: dict[int, bool | dict[str, Any]] = {}
    for m in root.modules():
        own = [p for p in m.parameters(recurse=False) if p.requires_grad]
        if own:
            dtype = own[0].dtype
            units[id(m)] = {
                "mixed_precision": MixedPrecision(param_dtype=dtype, reduce_dtype=dtype, buffer_dtype=dtype)
            }
            for child in m.children():  # frozen siblings (a DoRA layer's base) cannot share the adapter's unit
                units.setdefault(id(child), any(True for _ in child.parameters()))
        elif blocks and isinstance(m, blocks):
            units[id(m)] = True
    return units


def install_fsdp1_policy(trainer: L.Trainer, module: nn.Module) -> None:
    """Give ``trainer``'s ``FSDPStrategy`` :func:`fsdp1_wrap_policy` unless the user set a policy of their own."""
    strategy = trainer.strategy
    if isinstance(strategy, FSDPStrategy):
        kwargs: dict[str, Any] = strategy.kwargs
        kwargs.setdefault("auto_wrap_policy", fsdp1_wrap_policy(module))
        kwargs.setdefault("use_orig_params", True)  # frozen and trainable parameters side by side
