"""Inject LoRA into a model, freeze its base, and describe what trains. Pure torch (no Lightning).

Example:
    >>> names = inject_lora(model, LoRASpec(r=16, alpha=32, target_modules=["q_proj", "v_proj"]))  # doctest: +SKIP
    >>> print(trainable_table(model))  # doctest: +SKIP
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lightning_adapt.lora import AdapterModule, InitMethod, LoRALinear, lora_modules
from lightning_adapt.targeting import TargetingError, _matches, find_targets, replace_module


@dataclass(frozen=True)
class LoRASpec:
    """What to adapt and how; the arguments of :class:`~lightning_adapt.lora.LoRALinear` plus targeting."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | Sequence[str] | None = None
    exclude_modules: Sequence[str] = ()
    modules_to_save: Sequence[str] = ()
    init: InitMethod = "kaiming"
    use_rslora: bool = False
    use_dora: bool = False


def inject_lora(model: nn.Module, spec: LoRASpec) -> list[str]:
    """Wrap the targeted layers of ``model`` in :class:`LoRALinear` and freeze everything else.

    Idempotent: on a model that already holds adapters nothing is wrapped again (the adapted names are
    returned), so calling it on every ``configure_model`` is safe. ``modules_to_save`` stay fully trainable.

    Returns:
        The dotted names of the adapted layers.
    """
    existing = [name for name, _ in lora_modules(model)]
    if not existing:
        for name in find_targets(model, spec.target_modules, spec.exclude_modules):
            layer = LoRALinear(
                model.get_submodule(name),
                r=spec.r,
                alpha=spec.alpha,
                dropout=spec.dropout,
                init=spec.init,
                use_rslora=spec.use_rslora,
                use_dora=spec.use_dora,
            )
            replace_module(model, name, layer)
            existing.append(name)
    freeze_base(model, spec.modules_to_save)
    return existing


def freeze_base(model: nn.Module, modules_to_save: Sequence[str] = ()) -> None:
    """Freeze every parameter except adapter parameters and those of ``modules_to_save``."""
    model.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, AdapterModule):
            for param in module.adapter_params():
                param.requires_grad_(True)
    for name in select_modules(model, modules_to_save, argument="modules_to_save"):
        model.get_submodule(name).requires_grad_(True)


def select_modules(model: nn.Module, entries: Sequence[str], argument: str) -> list[str]:
    """Names of the modules matched by ``entries`` (targeting rules); an entry matching nothing is an error."""
    names = [name for name, _ in model.named_modules() if name]
    unmatched = [e for e in entries if not any(_matches(n, e) for n in names)]
    if unmatched:
        tops = sorted({n.rsplit(".", 1)[-1] for n in names})[:40]
        raise TargetingError(
            f"{argument}={list(entries)}: {unmatched} match no module. Module leaf names include {tops}. "
            f"Fix: use whole dotted names (e.g. 'classifier'), a '.suffix', or a full-match regex."
        )
    return [n for n in names if any(_matches(n, e) for e in entries)]


def logical_numel(param: torch.Tensor) -> int:
    """Number of weights a parameter stands for (a packed 4-bit tensor holds two per byte)."""
    quant_state = getattr(param, "quant_state", None)
    shape = getattr(quant_state, "shape", None)
    return int(torch.Size(shape).numel()) if shape is not None else param.numel()


@dataclass(frozen=True)
class TrainableRow:
    """One line of the trainable-parameter table."""

    kind: str
    layers: int
    trainable: int


def trainable_rows(model: nn.Module) -> list[TrainableRow]:
    """Trainable parameters per adapted layer type (leaf name), plus fully trained modules."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    seen: set[int] = set()
    for name, layer in lora_modules(model):
        row = counts[f"lora: {name.rsplit('.', 1)[-1]}"]
        row[0] += 1
        for param in layer.adapter_params():
            seen.add(id(param))
            row[1] += param.numel() if param.requires_grad else 0
    for name, param in model.named_parameters():
        if param.requires_grad and id(param) not in seen:
            row = counts[f"full: {name.rsplit('.', 1)[0]}"]
            row[0] = 1
            row[1] += param.numel()
    return [TrainableRow(kind, layers, n) for kind, (layers, n) in counts.items()]


def trainable_table(model: nn.Module) -> str:
    """A printable table: per adapted layer type the layer count and trainable parameters; then totals."""
    rows = trainable_rows(model)
    total = sum(logical_numel(p) for p in model.parameters())
    trainable = sum(r.trainable for r in rows)
    width = max([len(r.kind) for r in rows] + [len("trainable (total)")])
    lines = [f"{'module':<{width}}  {'layers':>6}  {'trainable':>12}"]
    lines += [f"{r.kind:<{width}}  {r.layers:>6}  {r.trainable:>12,}" for r in rows]
    lines.append(f"{'trainable (total)':<{width}}  {'':>6}  {trainable:>12,}")
    lines.append(f"{'all parameters':<{width}}  {'':>6}  {total:>12,}")
    lines.append(f"trainable: {100.0 * trainable / max(total, 1):.3f}% of {total:,} parameters")
    return "\n".join(lines)
