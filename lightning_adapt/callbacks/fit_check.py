"""``FitCheckCallback`` (recipe key ``fit_check:``): before the base is read, will the run fit its device?"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any, Literal, Protocol, get_args, runtime_checkable

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_adapt.callbacks._transform import transform_specs
from lightning_adapt.callbacks.paged_optimizer import PagedOptimizerPlugin
from lightning_adapt.callbacks.shard import ShardSpec, estimate_sharding
from lightning_adapt.errors import ConfigError
from lightning_adapt.memory.estimator import format_bytes
from lightning_adapt.memory.fit import Device, FitCheck, check_fit
from lightning_adapt.memory.live import describe_run
from lightning_adapt.optim import OPTIMIZERS
from lightning_adapt.resources import available_memory_bytes

FitMode = Literal["error", "warn", "off"]
#: Precision plugins that cast every floating weight (``Precision.convert_module``) after ``configure_model``.
_CAST = {"bf16-true": "bf16", "16-true": "fp16"}


@runtime_checkable
class Plannable(Protocol):
    """A module that can build its model on the meta device without reading a weight (:class:`~lightning_adapt.tasks.
    base.TaskModule`): within ``planned_model()`` the module holds it."""

    def planned_model(self) -> contextlib.AbstractContextManager[Any]: ...


class FitCheckCallback(L.Callback):
    """Before the base is read, estimate the run's peak on its device and stop a run that cannot fit.

    At ``setup`` of ``fit`` (before ``configure_model`` loads any weight) the module's model is built on the meta
    device (:meth:`~lightning_adapt.tasks.base.TaskModule.planned_model`; a model built in ``__init__`` is read as
    it is), described with the run's ``quantize:``, ``lora:``, ``paged_optimizer:`` and ``shard:`` settings, its
    precision, its optimizer (``configure_optimizers`` over the meta parameters) and the data module's
    ``batch_size`` and ``max_length``, and estimated (:mod:`lightning_adapt.memory.fit`): weights + gradients +
    optimizer state, which runs measure equal to the estimate and the first optimizer step holds at once, against
    the device's free memory (a GPU's, or the available RAM on CPU). When they alone exceed it by over 5% the run
    cannot fit: ``error`` stops it with one message (the estimate by component, the memory available and each change
    that would fit, with its estimate); when only the activations (an approximation) take it over, a warning. A run the
    estimator cannot describe (no Hugging Face model, an optimizer other than AdamW, FSDP1 or DeepSpeed) is not
    checked, and says why. Every rank checks its own device; one refusing stops them all.

    Example::

        Trainer(callbacks=[FitCheckCallback("warn")])

    Attributes:
        check: the last verdict, or ``None`` (see ``skipped``).
        skipped: why the last run was not checked, or ``None``.
    """

    def __init__(self, mode: FitMode = "error") -> None:
        """
        Args:
            mode: ``error``: refuse a run whose weights, gradients and optimizer state alone exceed the device's
                free memory by more than 5% (a run only its activations take over gets a warning); ``warn``: a
                warning in both cases, the run goes on; ``off``: no check.
        """
        super().__init__()
        if mode not in get_args(FitMode):
            raise ConfigError(
                f"fit_check={mode!r} is not one of {', '.join(get_args(FitMode))}. Fix: fit_check: error (refuse a run "
                "that cannot fit), warn (say so and go on) or off."
            )
        self.mode = mode
        self.check: FitCheck | None = None
        self.skipped: str | None = None

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self.mode == "off":
            return
        check, self.skipped = plan_fit(trainer, pl_module)
        self.check = check
        unfit = check is not None and check.verdict == "does not fit"
        refuse = unfit and self.mode == "error"
        if trainer.world_size > 1:  # every rank stops, or none: one rank leaving alone would hang the others
            refuse = trainer.strategy.reduce_boolean_decision(refuse, all=False)
        if refuse:
            raise ConfigError(check.message() if check is not None and unfit else _ANOTHER_RANK)
        if check is None:
            rank_zero_info(f"lightning-adapt: fit check skipped: {self.skipped}")
        elif check.verdict != "fits":
            rank_zero_warn(check.message())
        else:
            rank_zero_info(f"lightning-adapt: fit check: {check.summary()}")


_ANOTHER_RANK = (
    "fit_check: the run does not fit the device of another rank, whose message gives the estimate and the changes "
    "that fit. Fix: make one of them, or free memory on that device."
)


def plan_fit(
    trainer: L.Trainer, pl_module: L.LightningModule, datamodule: L.LightningDataModule | None = None
) -> tuple[FitCheck | None, str | None]:
    """The verdict on ``trainer.fit(pl_module, datamodule)`` before any weight is read, or ``(None, why it cannot be
    given)``; ``datamodule`` (default: the trainer's) gives the batch size and sequence length."""
    if (problem := _strategy_problem(trainer)) is not None:
        return None, problem
    device = trainer.strategy.root_device
    room = available_memory_bytes(str(device))
    if room is None:
        return None, f"the free memory of {device} cannot be read"
    callbacks = trainer.callbacks  # type: ignore[attr-defined]
    plugin = next((cb for cb in callbacks if isinstance(cb, PagedOptimizerPlugin)), None)
    settings = estimate_sharding(trainer)
    if plugin is not None:
        if "Lion" in plugin.optimizer:
            return None, f"paged_optimizer: {plugin.optimizer} is not modeled (AdamW only)"
        settings.update(
            optimizer="adamw-8bit" if "8bit" in plugin.optimizer else "adamw-fp32", state_bytes_per_tensor=0
        )
    with _planned(trainer, pl_module) as held:
        optimizer = None
        if plugin is None:
            try:
                optimizer = _first_optimizer(pl_module.configure_optimizers())
            except Exception as err:  # a user's configure_optimizers that needs more than the model's parameters
                return (
                    None,
                    f"configure_optimizers could not run before the model was built ({type(err).__name__}: {err})",
                )
            if optimizer is None:
                return None, "configure_optimizers returned no optimizer before the model was built"
        if held and trainer.precision in _CAST:
            settings["base_dtype"] = _CAST[trainer.precision]
        tokens = _tokens(datamodule or trainer.datamodule)  # type: ignore[attr-defined]
        run, why = describe_run(pl_module, transform_specs(trainer), optimizer, tokens, settings, planned=True)
        built = sum(p.numel() * p.element_size() for p in pl_module.parameters() if p.device == device)
    if run is None:
        return None, why
    where = room[1] + (f" + the {format_bytes(built)} of weights built already" if built else "")
    target = Device(str(device), room[0] + built, where, pages=device.type == "cuda")
    paged = plugin is not None and OPTIMIZERS[plugin.optimizer].paged
    return check_fit(run.shape, run.method, run.assumptions, target, paged), None


@contextlib.contextmanager
def _planned(trainer: L.Trainer, module: L.LightningModule) -> Iterator[bool]:
    """Within the block the module holds its model: built on the meta device, under the precision's default dtype, if
    it can plan (yields ``False``); else as it is (``True``: built already, cast later by a ``*-true`` precision)."""
    if not isinstance(module, Plannable):
        yield True
        return
    with trainer.precision_plugin.module_init_context(), module.planned_model():
        yield False


def _strategy_problem(trainer: L.Trainer) -> str | None:
    """Why the estimator's per-rank figures do not describe this strategy (``None``: they do)."""
    strategy = trainer.strategy
    sharded = any(isinstance(spec, ShardSpec) for spec in transform_specs(trainer))
    if sharded or isinstance(strategy, SingleDeviceStrategy):
        return None
    if isinstance(strategy, DDPStrategy) and not any(c.__name__ == "DeepSpeedStrategy" for c in type(strategy).__mro__):
        return None
    return f"{type(strategy).__name__} shards or offloads in ways the estimator does not model (shard: does)"


def _tokens(data: L.LightningDataModule | None) -> tuple[int, int] | None:
    """``(batch_size, max_length)`` of the data module, where it has both (the longest batch it can make)."""
    batch, length = getattr(data, "batch_size", None), getattr(data, "max_length", None)
    if isinstance(batch, int) and isinstance(length, int) and batch > 0 and length > 0:
        return batch, length
    return None


def _first_optimizer(conf: Any) -> torch.optim.Optimizer | None:
    """The first optimizer of what ``configure_optimizers`` may return (an optimizer, a dict, lists of them)."""
    if isinstance(conf, torch.optim.Optimizer):
        return conf
    if isinstance(conf, Mapping):
        return _first_optimizer(conf.get("optimizer"))
    if isinstance(conf, list | tuple) and conf:
        return _first_optimizer(conf[0])
    return None
