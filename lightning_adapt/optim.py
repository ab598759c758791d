"""Optimizer-side math of QLoRA: the bitsandbytes optimizer registry, param-group rebuilding, LoRA+, state size.

Everything here is plain torch (and a lazy bitsandbytes import); no Lightning. The
:class:`~lightning_adapt.callbacks.paged_optimizer.PagedOptimizerPlugin` callback only translates
Lightning hooks into calls of these functions.

Example:
    >>> import torch
    >>> model = torch.nn.Linear(4, 2)
    >>> user = torch.optim.AdamW(model.parameters(), lr=0.1)
    >>> groups = rebuild_param_groups(user.param_groups, model.parameters(), {"weight_decay": 0.0})
    >>> new = build_optimizer("AdamW", groups)  # bitsandbytes.optim.AdamW with lr=0.1, weight_decay=0.0
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from lightning_adapt.errors import ConfigError
from lightning_adapt.layers import require_bitsandbytes

OptimizerName = Literal[
    "PagedAdamW",
    "PagedAdamW8bit",
    "PagedAdamW32bit",
    "AdamW",
    "AdamW8bit",
    "AdamW32bit",
    "PagedAdam",
    "PagedAdam8bit",
    "PagedAdam32bit",
    "Adam",
    "Adam8bit",
    "Adam32bit",
    "PagedLion",
    "PagedLion8bit",
    "PagedLion32bit",
    "Lion",
    "Lion8bit",
    "Lion32bit",
]


@dataclass(frozen=True)
class OptimizerSpec:
    """What the plugin needs to know about one ``bitsandbytes.optim`` class.

    Attributes:
        paged: Whether its state lives in paged (unified) memory on CUDA.
        has_eps: Whether the update uses ``eps`` (Lion does not).
    """

    paged: bool
    has_eps: bool = True


def _family(base: str, has_eps: bool = True) -> dict[str, OptimizerSpec]:
    specs: dict[str, OptimizerSpec] = {}
    for prefix, paged in (("Paged", True), ("", False)):
        for suffix in ("", "8bit", "32bit"):
            specs[f"{prefix}{base}{suffix}"] = OptimizerSpec(paged=paged, has_eps=has_eps)
    return specs


#: Every supported optimizer, keyed by its ``bitsandbytes.optim`` class name.
OPTIMIZERS: dict[str, OptimizerSpec] = {**_family("AdamW"), **_family("Adam"), **_family("Lion", False)}

#: Group keys the plugin may override; every other key of the user's groups is carried over as is.
OVERRIDABLE = ("lr", "betas", "eps", "weight_decay")


def unknown_optimizer_problem(name: str) -> str | None:
    """Return a message if ``name`` is not in :data:`OPTIMIZERS`, else ``None``."""
    if name in OPTIMIZERS:
        return None
    return f"optimizer={name!r} is unknown; choose one of: {', '.join(OPTIMIZERS)}"


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """Return the ``bitsandbytes.optim`` class called ``name``.

    Raises:
        ConfigError: if ``name`` is not in :data:`OPTIMIZERS` (the message lists the available names).
    """
    problem = unknown_optimizer_problem(name)
    if problem is not None:
        raise ConfigError(problem)
    cls: type[torch.optim.Optimizer] = getattr(require_bitsandbytes().optim, name)
    return cls


def _scale_lr(group: dict[str, Any], lr: float) -> None:
    # An LR scheduler has already applied its first factor to group["lr"] (relative to
    # group["initial_lr"]); keep that factor so the override only replaces the base LR.
    initial = group.get("initial_lr")
    factor = group["lr"] / initial if initial else 1.0
    group["lr"] = lr * factor
    if initial is not None:
        group["initial_lr"] = lr


def _new_trainable(params: Iterable[Tensor], seen: set[int]) -> list[Tensor]:
    """Trainable ``params`` whose id is not in ``seen``, in order, each once; adds them to ``seen``."""
    kept: list[Tensor] = []
    for param in params:
        if param.requires_grad and id(param) not in seen:
            seen.add(id(param))
            kept.append(param)
    return kept


def rebuild_param_groups(
    groups: Sequence[Mapping[str, Any]],
    parameters: Iterable[torch.nn.Parameter],
    overrides: Mapping[str, Any],
) -> list[dict[str, Any]]:
    """Rebuild an optimizer's param groups to hold exactly the trainable ``parameters``.

    Contract:
        * every group keeps its position and every key except ``params`` (lr, betas, eps,
          weight_decay, ``initial_lr`` and any extra key), so LR schedulers and checkpoints that
          count groups stay valid; a group left without trainable params stays, empty;
        * frozen parameters (``requires_grad=False``) and duplicates are dropped;
        * trainable ``parameters`` that are in no group (e.g. LoRA adapters injected after the
          user's optimizer was built) are appended to the first group, which a scheduler covers;
          with no groups at all, one group holding them all is created;
        * ``overrides`` (keys of :data:`OVERRIDABLE`, ``None`` values ignored) win over the groups.
          An ``lr`` override replaces the base LR and keeps a scheduler factor already applied.

    Nothing is mutated: the input groups are copied.

    Args:
        groups: The param groups of the optimizer to replace (``optimizer.param_groups``).
        parameters: All parameters of the module, e.g. ``module.parameters()``.
        overrides: Hyperparameters that win over the groups' ones.

    Returns:
        New param groups (dicts) ready for an optimizer constructor.

    Raises:
        ConfigError: if no parameter is trainable.
    """
    seen: set[int] = set()
    new_groups = [{**group, "params": _new_trainable(group["params"], seen)} for group in groups]
    orphans = _new_trainable(parameters, seen)
    if not new_groups:
        new_groups.append({"params": []})
    new_groups[0]["params"].extend(orphans)
    if not any(group["params"] for group in new_groups):
        raise ConfigError(
            "No trainable parameter (requires_grad=True) found for the optimizer. Fix: add lora: (adapters) or "
            "train without quantize: (full fine-tuning)."
        )
    for group in new_groups:
        for key, value in overrides.items():
            if value is None:
                continue
            if key == "lr" and "lr" in group:  # a LoRA+ group keeps its ratio to the others
                _scale_lr(group, float(value) * float(group.get(LORA_PLUS, 1.0)))
            else:
                group[key] = value
    return new_groups


#: Param-group key of a LoRA+ group (the ``B`` factors split off one group) holding its learning-rate ratio.
LORA_PLUS = "lora_plus_ratio"
#: Group keys that are learning rates (a LoRA+ group holds them times its ratio): torch's, OneCycleLR's, CyclicLR's.
_LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr", "base_lr")
#: Per-group lists of LR schedulers (torch's), and whether they hold learning rates (else: per-group functions).
_SCHEDULER_LISTS = {"base_lrs": True, "_last_lr": True, "max_lrs": True, "min_lrs": True, "lr_lambdas": False}


def split_lora_plus(optimizer: torch.optim.Optimizer, b_params: Iterable[Tensor], ratio: float) -> dict[int, int]:
    """LoRA+: move the ``b_params`` of each group of ``optimizer`` into a new group whose learning rates are
    ``ratio ×`` the group's (every other key copied), in place, before any state exists. Idempotent: an optimizer
    that already holds a LoRA+ group (key :data:`LORA_PLUS`) is left alone.

    Returns:
        ``{source group index: new group index}``, for :func:`extend_scheduler`.
    """
    if any(LORA_PLUS in group for group in optimizer.param_groups):
        return {}
    ids = {id(p) for p in b_params}
    added: dict[int, int] = {}
    for index, group in enumerate(list(optimizer.param_groups)):
        moved = [p for p in group["params"] if id(p) in ids]
        if not moved:
            continue
        group["params"] = [p for p in group["params"] if id(p) not in ids]
        keys = {k: v * ratio if k in _LR_KEYS and isinstance(v, float | int) else v for k, v in group.items()}
        optimizer.add_param_group({**keys, "params": moved, LORA_PLUS: ratio})
        added[index] = len(optimizer.param_groups) - 1
    return added


def extend_scheduler(scheduler: Any, added: Mapping[int, int], ratio: float) -> None:
    """Give an LR scheduler built before :func:`split_lora_plus` an entry for each new group: its per-group lists
    (``base_lrs``, ``lr_lambdas``, ...) get the source group's entry (learning rates times ``ratio``); nested
    schedulers (``SequentialLR``, ``ChainedScheduler``) too. A list not one entry per group so far is left alone."""
    for child in getattr(scheduler, "_schedulers", None) or []:
        extend_scheduler(child, added, ratio)
    for source, new in sorted(added.items(), key=lambda item: item[1]):
        for attr, is_lr in _SCHEDULER_LISTS.items():
            values = getattr(scheduler, attr, None)
            if isinstance(values, list) and len(values) == new:
                values.append(values[source] * ratio if is_lr else values[source])


def build_optimizer(name: str, groups: list[dict[str, Any]], min_8bit_size: int = 4096) -> torch.optim.Optimizer:
    """Build the ``bitsandbytes.optim`` optimizer ``name`` over ``groups``.

    Keys missing from a group take the bitsandbytes class defaults.

    Args:
        name: A key of :data:`OPTIMIZERS`.
        groups: Param groups, e.g. from :func:`rebuild_param_groups`.
        min_8bit_size: Tensors with fewer elements keep 32-bit state in 8-bit optimizers.
    """
    cls = optimizer_class(name)
    return cls(groups, min_8bit_size=min_8bit_size)  # type: ignore[call-arg]


def mark_step_for_schedulers(optimizer: torch.optim.Optimizer) -> None:
    """Wrap ``optimizer.step`` the way ``torch.optim.lr_scheduler.LRScheduler.__init__`` does.

    The scheduler checks ``optimizer.step._wrapped_by_lr_sched`` and ``optimizer._opt_called`` on its
    first ``step()`` and warns otherwise. Idempotent. Mutates ``optimizer.step``.
    """
    if hasattr(optimizer.step, "_wrapped_by_lr_sched"):
        return
    opt_ref = weakref.ref(optimizer)
    func: Callable[..., Any] = optimizer.step.__func__  # type: ignore[attr-defined]

    def step(*args: Any, **kwargs: Any) -> Any:
        opt = opt_ref()
        opt._opt_called = True  # type: ignore[union-attr]
        return func(opt, *args, **kwargs)

    step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    optimizer.step = step  # type: ignore[method-assign]


def repoint_scheduler(scheduler: Any, optimizer: torch.optim.Optimizer) -> None:
    """Make an LR scheduler drive ``optimizer`` (which replaced the one it was built for).

    Sets ``scheduler.optimizer``, refreshes ``base_lrs`` from the groups' ``initial_lr`` (an lr
    override changes them) and marks ``optimizer.step`` (see :func:`mark_step_for_schedulers`).

    Raises:
        ValueError: if the scheduler's per-group lists do not match the optimizer's group count.
    """
    base_lrs = getattr(scheduler, "base_lrs", None)
    if base_lrs is not None and len(base_lrs) != len(optimizer.param_groups):
        raise ValueError(
            f"{type(scheduler).__name__} covers {len(base_lrs)} param groups, the new optimizer has "
            f"{len(optimizer.param_groups)}."
        )
    scheduler.optimizer = optimizer
    if base_lrs is not None and all("initial_lr" in g for g in optimizer.param_groups):
        scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
    mark_step_for_schedulers(optimizer)


def _tensors(value: Any) -> Iterable[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the tensors of ``optimizer.state`` (nested containers included).

    A tensor object shared by several params (bitsandbytes' quantization maps) counts once; an FSDP2-sharded
    state tensor counts this rank's shard.
    Parameters without state (never stepped, frozen) cost nothing.
    """
    seen: set[int] = set()
    total = 0
    for tensor in _tensors(list(optimizer.state.values())):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            local = tensor.to_local() if isinstance(tensor, DTensor) else tensor  # this rank's shard
            total += local.numel() * local.element_size()
    return total


@dataclass(frozen=True)
class StateReport:
    """Measured optimizer-state size.

    Attributes:
        total_bytes: :func:`optimizer_state_bytes`.
        trainable_params: Elements of the trainable params in the optimizer.
        bytes_per_param: ``total_bytes / trainable_params`` (≈8 for 32-bit Adam, ≈2 for 8-bit Adam
            on tensors of at least ``min_8bit_size`` elements, ≈1 for 8-bit Lion).
    """

    total_bytes: int
    trainable_params: int

    @property
    def bytes_per_param(self) -> float:
        return self.total_bytes / self.trainable_params if self.trainable_params else 0.0

    def __str__(self) -> str:
        return (
            f"optimizer state: {self.total_bytes / 2**20:.2f} MiB for {self.trainable_params:,} trainable "
            f"parameters = {self.bytes_per_param:.2f} bytes/parameter"
        )


def state_report(optimizer: torch.optim.Optimizer) -> StateReport:
    """Measure ``optimizer``'s state; see :class:`StateReport`."""
    numel = sum(p.numel() for g in optimizer.param_groups for p in g["params"] if p.requires_grad)
    return StateReport(total_bytes=optimizer_state_bytes(optimizer), trainable_params=numel)
