"""Stop, or skip the step, when the loss or a trainable parameter's gradient is NaN or infinite.

Without it a single NaN gradient poisons the adapters and the Adam moments, and training goes on silently on
garbage until the end of the run.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_adapt.errors import ConfigError, NonFiniteError

GuardAction = Literal["stop", "skip"]
_ACTIONS = ("stop", "skip")


class NonFiniteStepSkippedWarning(UserWarning):
    """A training step was skipped because its loss or a gradient was not finite (``action="skip"``)."""


class NonFiniteGuardCallback(Callback):
    """Check the loss before each backward and every trainable gradient before each optimizer step.

    On the first NaN/Inf, ``action="stop"`` raises :class:`~lightning_adapt.errors.NonFiniteError` before the
    optimizer touches anything (the last checkpoint stays clean); the message names the step, the epoch
    and batch, and the first parameter (in ``named_parameters`` order) whose gradient, or failing that whose
    value, is not finite. ``action="skip"`` drops every gradient of that step instead (``grad = None``, so
    neither the parameters nor the optimizer state change; Lightning's step counter and LR schedulers still
    advance), warns with the same message and records the step in :attr:`skipped_steps`.

    The check costs one device-to-host sync per step. Under ``16-mixed`` precision the gradient scaler
    already skips steps with infinite gradients while it calibrates its scale, so only the loss is checked
    there. Under DDP/FSDP every rank takes the same decision (any rank's non-finite value counts).

    Example:
        >>> trainer = pl.Trainer(callbacks=[NonFiniteGuardCallback(action="skip")])

    Args:
        action: ``"stop"`` raises at the first non-finite loss or gradient; ``"skip"`` skips that step.
    """

    def __init__(self, action: GuardAction = "stop") -> None:
        super().__init__()
        if action not in _ACTIONS:
            raise ConfigError(
                f"NonFiniteGuardCallback(action={action!r}): allowed are {list(_ACTIONS)}. Fix: pick one."
            )
        self.action = action
        self.skipped_steps: list[int] = []
        self._bad_loss: str | None = None

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        bad = trainer.strategy.reduce_boolean_decision(not bool(torch.isfinite(loss.detach()).all()), all=False)
        if bad and self._bad_loss is None:  # kept until the optimizer step (gradient accumulation)
            self._bad_loss = _describe(loss.detach(), "loss")
        if bad and self.action == "stop":
            self._raise_or_skip(trainer, pl_module, None)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        found = None
        if getattr(trainer.precision_plugin, "scaler", None) is None:
            grads = [(n, p.grad) for n, p in pl_module.named_parameters() if p.grad is not None]
            found = first_non_finite(grads)
            if not trainer.strategy.reduce_boolean_decision(found is not None, all=False):
                found = None
            elif found is None:
                found = "a gradient on another rank"
        if found is not None or self._bad_loss is not None:
            self._raise_or_skip(trainer, pl_module, found, optimizer)
        self._bad_loss = None

    def _raise_or_skip(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        gradient: str | None,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        loop = trainer.fit_loop.epoch_loop
        what = "gradient" if gradient is not None else "loss"
        weight = first_non_finite((n, p.detach()) for n, p in pl_module.named_parameters() if p.requires_grad)
        message = (
            f"Non-finite {what} at step {trainer.global_step} (epoch {trainer.current_epoch}, batch {loop.batch_idx}): "
            + "; ".join(
                part
                for part in (
                    self._bad_loss,
                    f"first non-finite gradient: {gradient}" if gradient else None,
                    f"first non-finite parameter: {weight}" if weight else "every trainable parameter is finite",
                )
                if part
            )
        )
        if self.action == "stop":
            self._bad_loss = None
            raise NonFiniteError(
                f"{message}. Fix: lower the learning rate, clip gradients (trainer.gradient_clip_val), use bf16 "
                "rather than fp16, check this batch's data, or set NonFiniteGuardCallback(action='skip')."
            )
        for group in optimizer.param_groups if optimizer is not None else []:
            for p in group["params"]:
                p.grad = None
        self.skipped_steps.append(trainer.global_step)
        rank_zero_warn(f"{message}. The step is skipped.", category=NonFiniteStepSkippedWarning)


def first_non_finite(named: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """``"name (k NaN, j Inf of n)"`` for the first tensor holding a NaN or an Inf, else ``None``.

    All tensors are checked with one device-to-host sync; a sharded tensor (DTensor) by its local shard.
    """
    pairs = [(name, _local(t)) for name, t in named]
    pairs = [(name, t) for name, t in pairs if t.numel()]
    if not pairs:
        return None
    finite = torch.stack([torch.isfinite(t).all().to(pairs[0][1].device) for _, t in pairs]).cpu()
    if bool(finite.all()):
        return None
    name, tensor = pairs[int((~finite).nonzero()[0])]
    return _describe(tensor, name)


def _describe(tensor: torch.Tensor, name: str) -> str:
    t = _local(tensor).detach()
    nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
    value = f" = {t.item()}" if t.numel() == 1 else ""
    return f"{name}{value} ({nan} NaN, {inf} Inf of {t.numel()})"


def _local(tensor: torch.Tensor) -> torch.Tensor:
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


__all__ = ["GuardAction", "NonFiniteGuardCallback", "NonFiniteStepSkippedWarning", "first_non_finite"]
