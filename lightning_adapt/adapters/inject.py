"""Inject LoRA into a model, freeze its base, and describe what trains. Pure torch (no Lightning).

Example:
    >>> names = inject_lora(model, LoRASpec(r=16, alpha=32, target_modules=["q_proj", "v_proj"]))  # doctest: +SKIP
    >>> print(trainable_table(model))  # doctest: +SKIP
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, cast

import torch
from torch import nn

from lightning_adapt.adapters.attention import LoRAMultiheadAttention, LoRAProjection
from lightning_adapt.adapters.delta import Foldable, InitMethod, lora_layers
from lightning_adapt.adapters.init import CHANGED_BASE_INITS
from lightning_adapt.adapters.kinds import AdapterOptions, LoRAConv, LoRAEmbedding, WeightAdapter, check_adaptable
from lightning_adapt.adapters.lora import LoRALinear, lora_modules
from lightning_adapt.adapters.parameters import LoRAParameters
from lightning_adapt.adapters.spec import LoRASpec as LoRASpec  # its home; imported from here too
from lightning_adapt.adapters.targeting import adaptable_kind, find_parameters, find_targets, replace_module
from lightning_adapt.errors import ConfigError
from lightning_adapt.layers import AdapterModule
from lightning_adapt.naming import select

_SPEC_ATTR = "_lightning_adapt_lora_spec"


def _options(spec: LoRASpec) -> AdapterOptions:
    """A non-linear kind's options (its init checked by :func:`_check_init_kinds`: never one that changes the base)."""
    return {"dropout": spec.dropout, "init": cast(InitMethod, spec.init), "use_rslora": spec.use_rslora}


#: The LoRA wrapper of each layer kind (:func:`~lightning_adapt.adapters.targeting.adaptable_kind`).
_KINDS: dict[str, type[WeightAdapter]] = {
    "conv": LoRAConv,
    "embedding": LoRAEmbedding,
    "attention": LoRAMultiheadAttention,
}


def _check_init_kinds(model: nn.Module, spec: LoRASpec, targets: list[str], owners: dict[str, Any]) -> None:
    """PiSSA / OLoRA / LoftQ start from a linear layer's ``(out, in)`` weight: refuse other kinds, naming them."""
    if spec.init not in CHANGED_BASE_INITS:
        return
    other = [n for n in targets if adaptable_kind(model.get_submodule(n)) != "linear"] + list(owners)
    if other:
        raise ConfigError(
            f"init={spec.init!r} applies to linear layers only, but the targets include {other[:3]} "
            f"({len(other)} not linear: convs, embeddings, attention modules, target_parameters). Fix: target "
            "their linear layers (exclude_modules / target_modules), or init='kaiming'."
        )


def wrap_layer(name: str, layer: nn.Module, spec: LoRASpec) -> nn.Module:
    """The LoRA wrapper of ``layer`` (dotted ``name``, for errors) for its kind.

    Raises:
        ConfigError: one line naming the layer and the fix, for a layer whose adapter could not act or merge
            exactly (a grouped conv, an embedding with ``max_norm``, DoRA on a non-linear kind).
    """
    kind = adaptable_kind(layer)
    if kind is None:
        raise ConfigError(f"{name} ({type(layer).__name__}): LoRA cannot wrap it. Fix: target its linear children.")
    check_adaptable(name, layer, spec.use_dora)
    if kind == "linear":
        return LoRALinear(layer, spec.r, spec.alpha, spec.dropout, spec.init, spec.use_rslora, spec.use_dora)
    return _KINDS[kind](layer, spec.r, spec.alpha, **_options(spec))


def inject_lora(model: nn.Module, spec: LoRASpec) -> list[str]:
    """Wrap the targeted layers of ``model`` in their LoRA wrapper (:func:`wrap_layer`) and freeze everything else.

    Idempotent for one spec: on a model already adapted with ``spec`` nothing is wrapped again (the adapted
    names are returned), so calling it on every ``configure_model`` is safe. ``modules_to_save`` stay fully
    trainable.

    Args:
        model: The model to adapt in place.
        spec: What to adapt and how.

    Returns:
        The dotted names of the adapted layers.

    Raises:
        ConfigError: ``model`` already holds adapters made with another spec (both are named).
    """
    existing = [name for name, _ in lora_layers(model)]
    if existing:
        _check_same_spec(model, spec, existing)
    else:
        targets = _module_targets(model, spec)
        owners = find_parameters(model, spec.target_parameters, targets)
        for name in targets:  # every layer checked before any is changed
            check_adaptable(name, model.get_submodule(name), spec.use_dora)
        if owners and spec.use_dora:
            raise ConfigError("target_parameters: DoRA is implemented for linear layers only. Fix: use_dora=False.")
        _check_init_kinds(model, spec, targets, owners)
        for name in targets:
            replace_module(model, name, wrap_layer(name, model.get_submodule(name), spec))
        for name, params in owners.items():
            wrapper = LoRAParameters(model.get_submodule(name), params, spec.r, spec.alpha, **_options(spec))
            replace_module(model, name, wrapper)
        existing += targets + list(owners)
        model.__dict__[_SPEC_ATTR] = spec
    freeze_base(model, spec.modules_to_save)
    keep_off_fused_paths(model)
    return existing


def _module_targets(model: nn.Module, spec: LoRASpec) -> list[str]:
    """:func:`find_targets`, or none for ``target_modules=[]`` beside ``target_parameters`` (parameters only)."""
    explicit_none = spec.target_modules is not None and not isinstance(spec.target_modules, str)
    if explicit_none and not list(spec.target_modules or ()) and spec.target_parameters:
        return []
    return find_targets(model, spec.target_modules, spec.exclude_modules)


def _no_fused_fast_path(module: nn.Module, args: Any) -> None:
    """A forward pre-hook that does nothing: torch skips ``TransformerEncoderLayer``'s fused path when one is set."""


def keep_off_fused_paths(model: nn.Module) -> None:
    """Keep torch's fused inference paths off where they would bypass adapters (idempotent).

    In eval mode without gradients ``nn.TransformerEncoderLayer`` hands ``linear1.weight``, ``linear2.weight`` and
    its attention's weights straight to one fused kernel, and ``nn.TransformerEncoder`` turns padded batches into
    nested tensors for it; neither calls the adapted layers. A layer holding an adapter gets a no-op forward
    pre-hook (torch's documented reason to take the general path) and its encoder ``use_nested_tensor = False``.
    """
    for module in model.modules():
        if not isinstance(module, nn.TransformerEncoderLayer | nn.TransformerEncoder):
            continue
        if not any(isinstance(m, Foldable) for m in module.modules()):
            continue
        if isinstance(module, nn.TransformerEncoder):
            module.use_nested_tensor = False
        elif _no_fused_fast_path not in module._forward_pre_hooks.values():
            module.register_forward_pre_hook(_no_fused_fast_path)


def _check_same_spec(model: nn.Module, spec: LoRASpec, existing: list[str]) -> None:
    """Refuse to re-adapt with another spec: keeping the old adapters silently would train something else."""
    recorded = model.__dict__.get(_SPEC_ATTR)
    if recorded is not None:
        same = _comparable(recorded) == _comparable(spec)
        held = repr(recorded)
    else:  # adapters made by hand: compare what the layers themselves hold
        layers: list[Any] = [layer for _, layer in lora_layers(model)]
        held = f"{len(layers)} LoRA layers with r={sorted({layer.r for layer in layers})}"
        same = all((layer.r, layer.alpha, layer.use_dora) == (spec.r, spec.alpha, spec.use_dora) for layer in layers)
    if not same:
        raise ConfigError(
            f"inject_lora: the model already holds LoRA adapters on {len(existing)} layers ({held}); "
            f"asked for {spec!r}. Fix: pass the same settings, or start from a model without adapters "
            "(merge_lora(model) first to fold the old ones in)."
        )


def _comparable(spec: LoRASpec) -> dict[str, object]:
    fields = asdict(spec)
    for key in ("target_modules", "exclude_modules", "modules_to_save", "target_parameters"):
        value = fields[key]
        fields[key] = value if value is None or isinstance(value, str) else tuple(value)
    return fields


def freeze_base(model: nn.Module, modules_to_save: Sequence[str] = ()) -> None:
    """Freeze every parameter except adapter parameters and those of ``modules_to_save``."""
    model.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, AdapterModule):
            for param in module.adapter_params():
                param.requires_grad_(True)
    names = [name for name, _ in model.named_modules() if name]
    for name in select(names, list(modules_to_save), "modules_to_save"):
        model.get_submodule(name).requires_grad_(True)


def changed_base_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """``(dotted name, layer)`` of every :class:`LoRALinear` whose base is not the original weight (``init`` pissa,
    olora or loftq): a merge into original weights, or an adapter for the original base, must use
    :meth:`LoRALinear.merged_weight_from_original` / :meth:`LoRALinear.original_factors` for them."""
    return [(name, layer) for name, layer in lora_modules(model) if layer.changes_base]


#: The ``B`` factors of each wrapper kind (the outer attention's own; its ``out_proj`` is a LoRAProjection).
_B_FACTORS: dict[type, Callable[[Any], list[torch.Tensor]]] = {
    LoRALinear: lambda m: [m.lora_B.weight],
    LoRAConv: lambda m: [m.lora_B.weight],
    LoRAProjection: lambda m: [m.lora_B.weight],
    LoRAEmbedding: lambda m: [m.lora_embedding_B],
    LoRAMultiheadAttention: lambda m: [b for _, b in m.pairs().values()],
    LoRAParameters: lambda m: list(m.lora_B.values()),
}


def lora_plus_params(model: nn.Module) -> list[torch.Tensor]:
    """The trainable ``B`` factor of every adapter in ``model`` (LoRA+ trains them with ``ratio ×`` the learning
    rate of ``A``), each once, in module order."""
    found: dict[int, torch.Tensor] = {}
    for module in model.modules():
        factors = next((get for kind, get in _B_FACTORS.items() if isinstance(module, kind)), None)
        for param in factors(module) if factors is not None else []:
            if param.requires_grad:
                found.setdefault(id(param), param)
    return list(found.values())


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
    for name, layer in lora_layers(model):
        row = counts[f"lora: {name.rsplit('.', 1)[-1]}"]
        row[0] += 1
        for param in cast(AdapterModule, layer).adapter_params():
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
