"""Export from an FSDP2-sharded run (``ModelParallelStrategy``): gather the adapters, merge on rank 0 from the
source files.

Every rank holds ``1/N`` of each weight, so no rank can merge in memory without first gathering the whole
model. The adapters are small: each rank takes part in gathering them (one all-gather per trainable tensor, in
``named_parameters`` order), rank 0 keeps them and merges them into the model's source safetensors as they
stream by (:meth:`MergeOnSaveCallback.export_checkpoint`: one tensor at a time, never the model twice), while
the other ranks wait for its outcome, which is broadcast so that a failed export fails every rank instead of
leaving them waiting.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch.distributed.tensor import DTensor

from lightning_adapt.errors import ExportError

__all__ = ["gather_trainable", "run_on_rank_zero"]


def gather_trainable(module: torch.nn.Module, keep: bool) -> dict[str, torch.Tensor]:
    """The full value of every trainable parameter, on CPU, by name (``{}`` where ``keep`` is false).

    A collective under FSDP2: call it on every rank, the same number of times.
    """
    gathered: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        full = param.full_tensor().detach() if isinstance(param, DTensor) else param.detach()
        if keep:
            gathered[name] = full.cpu().clone()
        del full
    return gathered


def run_on_rank_zero(trainer: L.Trainer, work: Callable[[], Any], what: str) -> Any:
    """Run ``work`` on global rank 0 and tell every rank whether it failed: rank 0 re-raises its own error, the
    other ranks raise an :class:`ExportError` quoting it. Returns ``work``'s result on rank 0, else ``None``."""
    result, failure = None, None
    try:
        if trainer.is_global_zero:
            result = work()
    except Exception as err:
        failure = err
    message = trainer.strategy.broadcast(None if failure is None else f"{type(failure).__name__}: {failure}")
    if failure is not None:
        raise failure
    if message is not None:
        raise ExportError(f"{what} failed on rank 0: {message}")
    return result
