"""PEFT's layout for ``target_parameters`` adapters (:class:`~lightning_adapt.adapters.parameters.LoRAParameters`).

PEFT adapts each targeted parameter with its own ``ParamWrapper``, nesting them on one module in the order the
module registered its parameters (the first innermost), so the parameter ``i`` of ``k`` targeted on ``<owner>``
has the keys ``<owner>.{"base_layer." * (k - 1 - i)}lora_A.weight`` / ``lora_B.weight``. Its ``A (r·E, in)`` and
``B (out, r·E)`` are ours as they are; only the keys differ. ``adapter_config.json`` lists the parameters under
``target_parameters`` and only the adapted modules under ``target_modules``.

:func:`to_peft_parameters` turns what :func:`~lightning_adapt.export.peft_format.write_adapter` wrote into that
layout (it does not import :mod:`.peft_format`: the export's import chain stays short). PEFT 0.21 refuses
``lora_dropout > 0`` on a ``ParamWrapper`` (its config has one dropout for every layer): :func:`no_parameter_layout`
says so and the export then writes no adapter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from lightning_adapt.adapters.delta import lora_layers
from lightning_adapt.adapters.parameters import LoRAParameters

__all__ = ["no_parameter_layout", "parameter_adapters", "to_peft_parameters"]


def parameter_adapters(root: nn.Module) -> list[tuple[str, LoRAParameters]]:
    """``(owner name, wrapper)`` of every :class:`LoRAParameters` in ``root``."""
    return [(name, m) for name, m in lora_layers(root) if isinstance(m, LoRAParameters)]


def no_parameter_layout(root: nn.Module) -> str | None:
    """Why PEFT could not load ``root``'s ``target_parameters`` adapters, else ``None``."""
    dropouts = {float(getattr(m.lora_dropout, "p", 0.0)) for _, m in lora_layers(root)}
    if parameter_adapters(root) and dropouts != {0.0}:
        return (
            f"PEFT 0.21 refuses lora_dropout > 0 with target_parameters (dropout={max(dropouts):g}; set 0 to get one)"
        )
    return None


def _peft_keys(owner: str, wrapper: LoRAParameters) -> dict[str, str]:
    """``{our key: PEFT's key}`` of one wrapper's adapters (relative to the model)."""
    order = [n for n in wrapper.base_layer._parameters if n in wrapper.parameter_names]
    keys: dict[str, str] = {}
    for i, name in enumerate(order):
        nesting = "base_layer." * (len(order) - 1 - i)
        for factor in ("lora_A", "lora_B"):
            keys[f"{owner}.{factor}.{name}"] = f"{owner}.{nesting}{factor}.weight"
    return keys


def _parameter_entries(root: nn.Module, wrappers: list[tuple[str, LoRAParameters]]) -> list[str]:
    """``target_parameters`` entries: ``<owner leaf>.<param>`` when those select exactly the adapted ones (PEFT's
    suffix rule), else the full names."""
    full = sorted(f"{owner}.{p}" for owner, w in wrappers for p in w.parameter_names)
    short = sorted({".".join(name.rsplit(".", 2)[-2:]) for name in full})
    every = [f"{n}.{p}".replace(".base_layer.", ".") for n, m in root.named_modules() for p in m._parameters]
    selected = {n for n in every if any(n == s or n.endswith("." + s) for s in short)}
    return short if selected == set(full) else full


def to_peft_parameters(root: nn.Module, out: Path, prefix: str) -> None:
    """Rewrite the PEFT adapter directory ``out`` of ``root`` (keys under ``prefix``) for its ``target_parameters``
    adapters: their keys as PEFT nests them, ``target_parameters`` in the config, their owners out of
    ``target_modules``; nothing to do without such adapters."""
    wrappers = parameter_adapters(root)
    if not wrappers:
        return
    owners = {owner for owner, _ in wrappers}
    config: dict[str, Any] = json.loads((out / "adapter_config.json").read_text())
    owner_leaves = {o.rsplit(".", 1)[-1] for o in owners}
    module_leaves = {n.rsplit(".", 1)[-1] for n, _ in lora_layers(root) if n not in owners}
    dropped = owners | (owner_leaves - module_leaves)
    config["target_modules"] = [t for t in config["target_modules"] if t not in dropped] or None
    config["target_parameters"] = _parameter_entries(root, wrappers)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    renamed = {prefix + k: prefix + v for owner, w in wrappers for k, v in _peft_keys(owner, w).items()}
    weights = out / "adapter_model.safetensors"
    state = load_file(weights)
    save_file({renamed.get(k, k): v for k, v in state.items()}, str(weights), metadata={"format": "pt"})
