"""Inject LoRA into a model, freeze its base, and describe what trains. Pure torch (no Lightning).

Example:
    >>> names = inject_lora(model, LoRASpec(r=16, alpha=32, target_modules=["q_proj", "v_proj"]))  # doctest: +SKIP
    >>> print(trainable_table(model))  # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from lightning_adapt.lora import AdapterModule, InitMethod, LoRALinear, lora_modules
from lightning_adapt.peft_format import PEFT_PREFIX, export_root
from lightning_adapt.safetensors_io import ExportError
from lightning_adapt.targeting import TargetingError, find_targets, matches, replace_module


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
    unmatched = [e for e in entries if not any(matches(n, e) for n in names)]
    if unmatched:
        tops = sorted({n.rsplit(".", 1)[-1] for n in names})[:40]
        raise TargetingError(
            f"{argument}={list(entries)}: {unmatched} match no module. Module leaf names include {tops}. "
            f"Fix: use whole dotted names (e.g. 'classifier'), a '.suffix', or a full-match regex."
        )
    return [n for n in names if any(matches(n, e) for e in entries)]


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


# --------------------------------------------------------------------------- starting from a PEFT adapter

#: Our LoRA setting -> its name in PEFT's adapter_config.json, and the default when neither sets it.
ADAPTER_SETTINGS: dict[str, tuple[str, object]] = {
    "r": ("r", 8),
    "alpha": ("lora_alpha", 16.0),
    "target_modules": ("target_modules", None),
    "use_rslora": ("use_rslora", False),
    "use_dora": ("use_dora", False),
    "modules_to_save": ("modules_to_save", None),
}


def _same(ours: object, theirs: object) -> bool:
    if isinstance(ours, list | tuple) or isinstance(theirs, list | tuple):
        as_set = lambda v: {v} if isinstance(v, str) else set(v or ())  # noqa: E731
        return as_set(ours) == as_set(theirs)
    return ours == theirs


def resolve_adapter_settings(
    explicit: dict[str, object], adapter_config: dict[str, Any] | None, argument: str = "adapter_path"
) -> dict[str, Any]:
    """Fill the settings the user left ``None`` from ``adapter_config`` (else the defaults); a setting the
    user gave that disagrees with the adapter is an error (all listed at once)."""
    resolved: dict[str, Any] = {}
    problems = []
    for ours, (theirs, default) in ADAPTER_SETTINGS.items():
        value, from_adapter = explicit.get(ours), (adapter_config or {}).get(theirs)
        if adapter_config is not None and value is not None and not _same(value, from_adapter):
            problems.append(f"{ours}={value!r} but the adapter has {theirs}={from_adapter!r}")
        resolved[ours] = value if value is not None else (from_adapter if from_adapter is not None else default)
    unsupported = {k: (adapter_config or {}).get(k) for k in ("rank_pattern", "alpha_pattern", "layers_to_transform")}
    problems += [f"the adapter uses {k}={v!r}, which is not supported" for k, v in unsupported.items() if v]
    if adapter_config is not None and adapter_config.get("bias", "none") != "none":
        problems.append(f"the adapter trains biases (bias={adapter_config['bias']!r}); only bias='none' is supported")
    if problems:
        raise ValueError(
            f"{argument}: " + "; ".join(problems) + ". Fix: leave these settings unset to take the adapter's values."
        )
    return resolved


def read_adapter(path: str | Path, argument: str = "adapter_path") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(adapter_config.json, weights)`` of a PEFT LoRA adapter directory (safetensors only)."""
    directory = Path(path)
    config_file, weights = directory / "adapter_config.json", directory / "adapter_model.safetensors"
    if not (config_file.is_file() and weights.is_file()):
        raise ExportError(
            f"{argument}={str(path)!r}: expected a PEFT adapter directory with adapter_config.json and "
            "adapter_model.safetensors. Fix: pass the directory PeftModel.save_pretrained (or export) wrote."
        )
    config: dict[str, Any] = json.loads(config_file.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ExportError(f"{argument}={str(path)!r}: peft_type={config.get('peft_type')!r}; only LORA is supported.")
    return config, load_file(str(weights))


@torch.no_grad()
def load_adapter_weights(module: nn.Module, weights: dict[str, torch.Tensor], argument: str = "adapter_path") -> None:
    """Copy PEFT-keyed adapter weights into the injected ``module``; every adapter weight must be covered."""
    prefix, root, _ = export_root(module)
    own = dict(module.named_parameters())
    mapped = {prefix + k.removeprefix(PEFT_PREFIX): v for k, v in weights.items()}
    unknown = [k for k in mapped if k not in own]
    shapes = [
        f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in mapped.items()
        if k in own and v.shape != own[k].shape
    ]
    adapter_ids = {id(p) for _, layer in lora_modules(root) for p in layer.adapter_params()}
    adapter_keys = {k for k, p in own.items() if id(p) in adapter_ids}
    missing = sorted(adapter_keys - set(mapped))
    if unknown or shapes or missing:
        raise ExportError(
            f"{argument}: the adapter does not fit the injected model (unknown keys {unknown[:3]}, shape mismatches "
            f"{shapes[:3]}, missing {missing[:3]}). Fix: use the base model and r/target_modules it was trained with."
        )
    for key, value in mapped.items():
        own[key].copy_(value)
