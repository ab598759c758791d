"""Run structural model transforms right after ``configure_model``, in a fixed order.

Lightning calls ``Callback.setup`` before ``LightningModule.configure_model`` and restores checkpoint
weights right after it, so the only point where a transform sees the finished network *and* precedes the
weight restore, ``configure_optimizers`` and the precision plugin is the end of ``configure_model``. Each
callback registers a transform with a priority (quantization before LoRA injection, whatever order the
callbacks were listed in); the first registration wraps the instance's ``configure_model`` with a plain
bound method (``functools.wraps`` would set ``__wrapped__``, which makes Lightning's ``is_overridden``
skip the hook) and teardown puts the original back.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any, ClassVar

import lightning as L
import torch
import torch.nn as nn
from lightning.pytorch.strategies import DDPStrategy
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import override

from lightning_adapt.adapters.checkpoint import base_fingerprint
from lightning_adapt.callbacks._fsdp1 import install_fsdp1_policy
from lightning_adapt.callbacks.atomic_checkpoint import install_atomic_checkpoint_io
from lightning_adapt.errors import ConfigError

Transform = Callable[[nn.Module], object]

#: Priorities: lower runs first.
QUANTIZE = 0
INJECT_LORA = 10
SHARD = 50  # FSDP2 after the adapters exist, so that it shards them too
DISTRIBUTED = 100  # after every structural change: what the strategy must know about the final model

_ATTR = "_lightning_adapt_transforms"
_ORIGINAL = "_lightning_adapt_configure_model"


def register_transform(module: nn.Module, name: str, priority: int, fn: Transform) -> None:
    """Run ``fn(module)`` after ``module.configure_model()``; registering ``name`` again replaces it.

    Transforms must be idempotent: Lightning calls ``configure_model`` on every fit/validate/test/predict.
    """
    transforms: dict[str, tuple[int, Transform]] = module.__dict__.setdefault(_ATTR, {})
    transforms[name] = (priority, fn)
    if _ORIGINAL in module.__dict__:
        return
    original: Callable[[], None] = getattr(module, "configure_model")  # noqa: B009
    module.__dict__[_ORIGINAL] = original

    def configure_model(self: Any) -> None:
        original()
        run_transforms(self)

    setattr(module, "configure_model", types.MethodType(configure_model, module))  # noqa: B010


def run_transforms(module: nn.Module) -> None:
    """Apply the registered transforms now, lowest priority first."""
    for _, fn in sorted(module.__dict__.get(_ATTR, {}).values(), key=lambda item: item[0]):
        fn(module)


def unregister_transform(module: nn.Module, name: str) -> None:
    """Forget ``name``; once none is left, restore the module's own ``configure_model``."""
    transforms: dict[str, Any] = module.__dict__.get(_ATTR, {})
    transforms.pop(name, None)
    if not transforms and _ORIGINAL in module.__dict__:
        del module.__dict__[_ORIGINAL]
        module.__dict__.pop("configure_model", None)
        module.__dict__.pop(_ATTR, None)


class ModelTransformCallback(L.Callback):
    """Base of the callbacks that change the model's structure right after ``configure_model``.

    A subclass declares its ``name`` and ``priority`` (lower runs first) and implements :meth:`apply`
    (idempotent) and :attr:`spec` (its settings, as a plain dataclass of the math layer, e.g. a
    ``QuantPlan`` or a ``LoRASpec``). Other parts find transforms through this base class and read their
    settings through ``spec``: the memory report describes the run from them, and ``lightning-adapt
    export`` rebuilds the trained structure with :func:`build_model`.
    """

    name: ClassVar[str]
    priority: ClassVar[int]

    @property
    def spec(self) -> object:
        """The settings of this transform (a frozen dataclass)."""
        raise NotImplementedError

    def apply(self, module: nn.Module) -> object:
        """Transform ``module`` in place; must be idempotent."""
        raise NotImplementedError

    def before_configure_model(self, module: nn.Module) -> None:
        """Tell ``module`` what it may use while it builds itself (e.g. quantize while loading); default: nothing."""

    def after_teardown(self, module: nn.Module) -> None:
        """Undo :meth:`before_configure_model`; default: nothing."""

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.before_configure_model(pl_module)
        register_transform(pl_module, self.name, self.priority, self.apply)
        if isinstance(trainer.strategy, DDPStrategy):
            register_transform(pl_module, "ddp_frozen_base", DISTRIBUTED, ddp_ignore_frozen)
        install_fsdp1_policy(trainer, pl_module)  # FSDP1 (CUDA): adapters in units of their own
        install_atomic_checkpoint_io(trainer)  # a kill mid-save cannot leave a half-written last.ckpt

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self is transform_callbacks(trainer)[0]:  # once per run, whichever transforms are present
            check_same_base_on_every_rank(trainer, pl_module)

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        unregister_transform(pl_module, self.name)
        unregister_transform(pl_module, "ddp_frozen_base")
        self.after_teardown(pl_module)


def ddp_ignore_frozen(module: nn.Module) -> None:
    """Tell DDP to leave the frozen parameters alone: it would broadcast them from rank 0 when it wraps the
    model (the whole base, for a few adapter weights), and they get no gradient buckets anyway. Every rank
    loads the same base; :func:`check_same_base_on_every_rank` verifies that instead of copying it."""
    frozen = [name for name, param in module.named_parameters() if not param.requires_grad]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, frozen)


def check_same_base_on_every_rank(trainer: L.Trainer, module: nn.Module) -> None:
    """Compare a checksum of the frozen base across ranks (a base not broadcast must be identical everywhere).

    Raises:
        ConfigError: ranks hold different frozen weights (e.g. a randomly initialised base with per-rank seeds).
    """
    if trainer.world_size < 2:
        return

    def gather(local: torch.Tensor) -> list[torch.Tensor]:
        gathered = trainer.strategy.all_gather(local.to(trainer.strategy.root_device))
        return list(gathered.reshape(trainer.world_size, -1).cpu())

    check_same_base(module, gather, "under DDP it is not broadcast")


def check_same_base(module: nn.Module, gather: Callable[[torch.Tensor], list[torch.Tensor]], why: str) -> None:
    """Gather every rank's checksum of ``module``'s frozen parameters with ``gather`` and refuse a difference.

    Raises:
        ConfigError: naming the ranks that differ from rank 0, ``why`` they must not, and the fix.
    """
    frozen = {name: p for name, p in module.named_parameters() if not p.requires_grad}
    gathered = gather(base_fingerprint(frozen, sorted(frozen)))
    differ = [rank for rank, other in enumerate(gathered) if not torch.equal(other, gathered[0])]
    if differ:
        raise ConfigError(
            f"the frozen base differs between rank 0 and rank(s) {differ}: {why}, so every rank must build it "
            "identically. Fix: load the base from the same files on every rank, or seed its random "
            "initialisation identically (seed_everything before building it)."
        )


def transform_callbacks(trainer: L.Trainer | None) -> list[ModelTransformCallback]:
    """The trainer's model transforms, in the order they run."""
    callbacks = getattr(trainer, "callbacks", None) or []
    found = [cb for cb in callbacks if isinstance(cb, ModelTransformCallback)]
    return sorted(found, key=lambda cb: cb.priority)


def transform_specs(trainer: L.Trainer | None) -> list[object]:
    """The ``spec`` of every model transform of ``trainer``: what the run's structure was built from."""
    return [cb.spec for cb in transform_callbacks(trainer)]


def build_model(trainer: L.Trainer, module: L.LightningModule) -> None:
    """Build ``module`` outside a fit loop as training built it: ``configure_model`` then the transforms."""
    transforms = transform_callbacks(trainer)
    for callback in transforms:
        callback.before_configure_model(module)
        register_transform(module, callback.name, callback.priority, callback.apply)
    try:
        module.configure_model()
    finally:
        for callback in transforms:
            unregister_transform(module, callback.name)
            callback.after_teardown(module)
