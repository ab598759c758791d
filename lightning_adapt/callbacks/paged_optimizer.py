"""Swap the module's optimizer for a paged and/or 8-bit bitsandbytes one, by configuration.

The math (registry, param-group rebuild, state size) lives in :mod:`lightning_adapt.optim`; this
callback only maps Lightning hooks onto it.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_adapt.errors import ConfigError
from lightning_adapt.layers import require_bitsandbytes
from lightning_adapt.optim import (
    OPTIMIZERS,
    OptimizerName,
    StateReport,
    build_optimizer,
    rebuild_param_groups,
    repoint_scheduler,
    state_report,
    unknown_optimizer_problem,
)


class PagedOptimizerFallbackWarning(UserWarning):
    """A paged optimizer runs on CPU parameters, where bitsandbytes falls back to non-paged state."""


def _is_deepspeed(strategy: object) -> bool:
    # By class name: DeepSpeed is optional and importing Lightning's strategy module for an
    # isinstance check would require it.
    return any(cls.__name__ == "DeepSpeedStrategy" for cls in type(strategy).__mro__)


class PagedOptimizerPlugin(Callback):
    """Replace the optimizer built by ``configure_optimizers`` with a ``bitsandbytes.optim`` one.

    At ``on_fit_start`` (after Lightning built the user's optimizer and before it restores optimizer
    state from a checkpoint, so resuming loads into the new optimizer) the plugin builds
    ``bitsandbytes.optim.<optimizer>`` over the module's **trainable** parameters: each param group
    keeps its hyperparameters and extra keys (overrides below win), frozen parameters are dropped and
    trainable parameters missing from every group (e.g. LoRA adapters injected after the optimizer
    was built) join the first group. LR schedulers are re-pointed to the new optimizer. After the first
    optimizer step the state size is printed once and logged as ``optimizer_state/bytes`` and
    ``optimizer_state/bytes_per_param``.

    Paged optimizers page their state between GPU and CPU memory under memory spikes; on CPU they
    fall back to their non-paged form (one :class:`PagedOptimizerFallbackWarning`). DeepSpeed owns
    its optimizer and is refused; so is more than one optimizer.

    Example:
        >>> trainer = pl.Trainer(callbacks=[PagedOptimizerPlugin("PagedAdamW8bit", lr=2e-4)])

    Args:
        optimizer: The ``bitsandbytes.optim`` class name. ``Paged*`` page their state, ``*8bit``
            keep 8-bit state (≈2 bytes per parameter for Adam instead of 8), ``*32bit`` and the bare
            names keep 32-bit state.
        lr: Learning rate for every group, replacing the user's base LR (a scheduler keeps
            scaling it). ``None`` keeps the user's.
        betas: Adam / Lion ``(beta1, beta2)`` for every group. ``None`` keeps the user's.
        eps: Adam epsilon for every group (Lion has none). ``None`` keeps the user's.
        weight_decay: Weight decay for every group. ``None`` keeps the user's.
        min_8bit_size: Tensors with fewer elements keep 32-bit state in 8-bit optimizers.
    """

    def __init__(
        self,
        optimizer: OptimizerName = "PagedAdamW8bit",
        lr: float | None = None,
        betas: tuple[float, float] | None = None,
        eps: float | None = None,
        weight_decay: float | None = None,
        min_8bit_size: int = 4096,
    ) -> None:
        super().__init__()
        betas = tuple(betas) if betas is not None else None  # type: ignore[assignment]
        _validate(optimizer, lr, betas, eps, weight_decay, min_8bit_size)
        require_bitsandbytes()  # every optimizer here is a bitsandbytes one: say so now, not at the first step
        self.optimizer = optimizer
        self.overrides: dict[str, Any] = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        self.min_8bit_size = min_8bit_size
        self.last_report: StateReport | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and _is_deepspeed(trainer.strategy):
            raise ConfigError(
                "PagedOptimizerPlugin cannot be used with DeepSpeed: DeepSpeed builds and owns its "
                "optimizer. Remove the `paged_optimizer` setting or use another strategy (ddp, fsdp)."
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        old = trainer.strategy.optimizers
        if len(old) > 1:
            raise ConfigError(
                f"PagedOptimizerPlugin replaces a single optimizer, but configure_optimizers returned "
                f"{len(old)}. Return one optimizer (with param groups) or remove the plugin."
            )
        groups = rebuild_param_groups(old[0].param_groups if old else [], pl_module.parameters(), self.overrides)
        new = build_optimizer(self.optimizer, groups, self.min_8bit_size)
        if OPTIMIZERS[self.optimizer].paged and any(p.device.type == "cpu" for g in groups for p in g["params"]):
            rank_zero_warn(
                f"{self.optimizer} runs on CPU parameters: bitsandbytes falls back to non-paged optimizer "
                "state there (memory paging needs CUDA).",
                category=PagedOptimizerFallbackWarning,
            )
            # bitsandbytes would warn once more per optimizer instance; this warning replaces it.
            new._cpu_paged_warned = True  # type: ignore[attr-defined]
        for config in trainer.lr_scheduler_configs:
            repoint_scheduler(config.scheduler, new)
        trainer.strategy.optimizers = [new]
        self.last_report = None

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.last_report is not None or trainer.global_step == 0 or not trainer.strategy.optimizers:
            return
        self.last_report = report = state_report(trainer.strategy.optimizers[0])
        rank_zero_info(f"{self.optimizer} {report}")
        pl_module.log_dict(
            {
                "optimizer_state/bytes": float(report.total_bytes),
                "optimizer_state/bytes_per_param": report.bytes_per_param,
            },
            on_step=True,
            on_epoch=False,
        )


def _validate(
    optimizer: str,
    lr: float | None,
    betas: tuple[float, float] | None,
    eps: float | None,
    weight_decay: float | None,
    min_8bit_size: int,
) -> None:
    problems: list[str] = []
    unknown = unknown_optimizer_problem(optimizer)
    if unknown is not None:
        problems.append(unknown)
    if lr is not None and not lr > 0:
        problems.append(f"lr={lr} must be > 0 (or None to keep the configured one)")
    if betas is not None and (len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas)):
        problems.append(f"betas={betas} must be two values in [0, 1)")
    if eps is not None and not eps >= 0:
        problems.append(f"eps={eps} must be >= 0")
    if eps is not None and unknown is None and not OPTIMIZERS[optimizer].has_eps:
        problems.append(f"eps={eps} is not used by {optimizer}; leave it unset")
    if weight_decay is not None and not weight_decay >= 0:
        problems.append(f"weight_decay={weight_decay} must be >= 0")
    if min_8bit_size < 1:
        problems.append(f"min_8bit_size={min_8bit_size} must be >= 1")
    if problems:
        raise ConfigError("Invalid PagedOptimizerPlugin settings:\n  - " + "\n  - ".join(problems))


__all__ = ["PagedOptimizerFallbackWarning", "PagedOptimizerPlugin"]
