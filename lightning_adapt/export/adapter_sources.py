"""Where the adapters of a streaming merge come from: a Lightning checkpoint or a PEFT directory.

Each builder returns :class:`~lightning_adapt.export.stream_merge.Adapters` keyed by the merged model's names
(the checkpoint's, see :func:`~lightning_adapt.export.stream_merge.model_keys`), checked against the base
checkpoint's headers (names and shapes) before anything is written:

* :func:`adapters_from_checkpoint`: an adapter-only Lightning ``state_dict`` (``model.<layer>.lora_A.weight``
  and the trained non-adapter tensors) plus the recipe's LoRA settings.
* :func:`adapters_from_peft`: ``adapter_config.json`` + ``adapter_model.safetensors``.

Adapter tensors are recognised by their keys in the file formats (ours and PEFT's agree), the only way
without a model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from lightning_adapt.adapters.checkpoint import FINGERPRINT_KEY
from lightning_adapt.adapters.init import original_factors
from lightning_adapt.adapters.lora import lora_scaling
from lightning_adapt.adapters.spec import LoRASpec
from lightning_adapt.errors import SETTING, ExportError, setting_names
from lightning_adapt.export.peft_format import PEFT_PREFIX, read_adapter, resolve_adapter_settings
from lightning_adapt.export.safetensors_io import StoredTensor
from lightning_adapt.export.stream_merge import Adapters, LayerAdapter

__all__ = [
    "ADAPTER_SUFFIXES",
    "adapters_from_checkpoint",
    "adapters_from_peft",
    "unfolded_adapter_keys",
]

#: How the adapter tensors of a layer are keyed in a state dict (ours and PEFT's), by role.
ADAPTER_SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_magnitude_vector": "m",
    ".lora_magnitude_vector.weight": "m",
    ".lora_embedding_A": "EA",  # an embedding: W (num, dim) += scaling · (B @ A)ᵀ, i.e. stored (in, out) as Conv1D
    ".lora_embedding_B": "EB",
    ".lora_A0": "A0",  # the initial pair of a changed base (PiSSA / OLoRA / LoftQ): merged as [A; A0], [B, -B0]
    ".lora_B0": "B0",
}

Keys = Mapping[str, StoredTensor]


def _error(message: str) -> ExportError:
    """An error about the checkpoint being exported (setting ``ckpt_path``; :data:`SETTING` in ``message``)."""
    return ExportError(message, setting="ckpt_path")


def _module_prefix(layer_names: Iterable[str], keys: Keys) -> str:
    """The shortest dotted prefix (e.g. ``model.`` of ``self.model``) whose removal maps every adapted
    layer onto a ``<layer>.weight`` of the checkpoint."""
    names = sorted(layer_names)
    first = names[0].split(".")
    for i in range(len(first)):
        prefix = ".".join(first[:i]) + ("." if i else "")
        if all(n.startswith(prefix) and n[len(prefix) :] + ".weight" in keys for n in names):
            return prefix
    raise _error(
        f"{SETTING}: the adapted layers ({names[:3]}) have no weight in the base checkpoint (keys such as "
        f"{list(keys)[:3]}). Fix: export with the base model the adapter was trained on."
    )


def _split_adapter_keys(state: Mapping[str, Any]) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """``({layer: {"A"|"B"|"m": tensor}}, {other key: value})`` of a state dict in our or PEFT's layout."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    other: dict[str, Any] = {}
    for key, value in state.items():
        suffix = next((s for s in ADAPTER_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            other[key] = value
        else:
            layers.setdefault(key[: -len(suffix)], {})[ADAPTER_SUFFIXES[suffix]] = value
    return layers, other


def unfolded_adapter_keys(state: Iterable[str]) -> list[str]:
    """The adapter keys of ``state`` that no :class:`LayerAdapter` folds: ``target_parameters`` pairs
    (``experts.lora_A.gate_up_proj``) and other kinds only the live model's merge handles."""
    return sorted(k for k in state if ".lora_" in k and not any(k.endswith(s) for s in ADAPTER_SUFFIXES))


def _orient(parts: dict[str, dict[str, torch.Tensor]], keys: Keys, fan_in_fan_out: bool) -> dict[str, bool]:
    """Per layer: is the base weight stored ``(in, out)`` (Conv1D)? Decided by the stored shape; a square
    weight follows the other adapted layers of the model, else ``fan_in_fan_out`` (PEFT's flag)."""
    verdicts: dict[str, bool | None] = {}
    for name, p in parts.items():
        shape = keys[name + ".weight"].shape
        out_in = (int(p["B"].shape[0]), int(p["A"].shape[1])) if "A" in p and "B" in p else (0, 0)
        square_or_wrong = out_in[0] == out_in[1] or shape not in (out_in, out_in[::-1])
        verdicts[name] = None if square_or_wrong else shape == out_in[::-1]
    known = {v for v in verdicts.values() if v is not None}
    default = known.pop() if len(known) == 1 else fan_in_fan_out
    return {name: default if v is None else v for name, v in verdicts.items()}


def _layer_adapters(
    parts: dict[str, dict[str, torch.Tensor]], keys: Keys, settings: LoRASpec, fan_in_fan_out: bool
) -> dict[str, LayerAdapter]:
    """A checked :class:`LayerAdapter` per layer; every problem is listed in one error."""
    embeddings = {name for name, p in parts.items() if "EA" in p or "EB" in p}
    parts = {name: {k.removeprefix("E"): v for k, v in p.items()} for name, p in parts.items()}
    conv1d = _orient({n: p for n, p in parts.items() if n not in embeddings}, keys, fan_in_fan_out)
    conv1d |= dict.fromkeys(embeddings, True)
    problems, layers = [], {}
    scaling = lora_scaling(settings.r, settings.alpha, settings.use_rslora)
    if convs := [name for name, p in parts.items() if "A" in p and p["A"].dim() != 2]:
        raise _error(
            f"{SETTING}: {convs[0]!r} holds a convolution adapter, which the streamed export does not merge. Fix: "
            "export the trained module in memory (lightning_adapt.export.exporter.export_model), which folds it."
        )
    for name, p in parts.items():
        if "A" not in p or "B" not in p or ("m" in p) != settings.use_dora:
            problems.append(f"{name} holds {sorted(p)} with use_dora={settings.use_dora}")
            continue
        factors = original_factors(p["A"], p["B"], p["A0"], p["B0"]) if "A0" in p and "B0" in p else (p["A"], p["B"])
        layer = LayerAdapter(*factors, scaling, p.get("m"), conv1d[name])
        stored = keys[name + ".weight"].shape
        if p["A"].shape[0] != settings.r or p["B"].shape[1] != settings.r or stored != layer.stored_shape():
            a, b = tuple(p["A"].shape), tuple(p["B"].shape)
            problems.append(f"{name}: A {a}, B {b} vs r={settings.r} and base weight {stored}")
        layers[name] = layer
    if problems:
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise _error(
            f"{SETTING}: the adapter shapes do not fit the base model and LoRA settings ({'; '.join(problems[:3])}"
            f"{more}). Fix: export with the base model and the lora: settings (r, use_dora) it was trained with."
        )
    return layers


def _tied_drop(keys: Keys, tied_keys: Iterable[str], layers: Iterable[str]) -> set[str]:
    """The tied keys present in the checkpoint (``from_pretrained`` re-ties them); an adapted tied layer is an error."""
    tied = set(tied_keys)
    adapted = sorted(name for name in layers if name + ".weight" in tied)
    if adapted:
        raise _error(
            f"{SETTING}: the adapter adapts {adapted}, whose weight is tied to another module: the merged weight "
            "would be re-tied (and lost) on load. Fix: exclude it from target_modules (add it to exclude_modules)."
        )
    return {key for key in tied if key in keys}


def adapters_from_checkpoint(
    state: Mapping[str, Any],
    keys: Keys,
    settings: LoRASpec,
    *,
    modules_to_save: Iterable[str] = (),
    tied_keys: Iterable[str] = (),
    fan_in_fan_out: bool = False,
    prefix: str | None = None,
) -> Adapters:
    """The adapters of an adapter-only ``state_dict`` (trainable keys only, e.g.
    ``model.model.layers.0.self_attn.q_proj.lora_A.weight``). Every other tensor under the module prefix is
    trained and replaces the stored one. ``prefix`` (``None``: found by matching the adapted layers to
    ``keys``) is removed from every key; keys outside it (the base fingerprint, other attributes) are ignored.

    Raises:
        ExportError: no adapter in ``state``, layers the base lacks, shapes that do not fit (all listed).
    """
    if unfolded := unfolded_adapter_keys(state):
        raise _error(
            f"{SETTING}: {unfolded[0]!r} is an adapter the streamed merge does not fold ({len(unfolded)} such "
            "tensors). Fix: merge the trained model in memory: lightning-adapt export rebuilds it for such a "
            "checkpoint (lightning_adapt.export.exporter.export_model)."
        )
    parts, other = _split_adapter_keys(state)
    if not parts:
        raise _error(f"{SETTING}: holds no LoRA adapter weights. Fix: pass the checkpoint of a LoRA run.")
    prefix = _module_prefix(parts, keys) if prefix is None else prefix
    parts = {name.removeprefix(prefix): p for name, p in parts.items()}
    missing = sorted(name for name in parts if name + ".weight" not in keys)
    if missing:
        raise _error(f"{SETTING}: adapted layers without a base weight in the checkpoint: {missing[:5]}.")
    replace = {
        key[len(prefix) :].replace(".base_layer.", "."): value
        for key, value in other.items()
        if key != FINGERPRINT_KEY and key.startswith(prefix) and isinstance(value, torch.Tensor)
    }
    layers = _layer_adapters(parts, keys, settings, fan_in_fan_out)
    drop = _tied_drop(keys, tied_keys, parts)
    changed = any("A0" in p for p in parts.values())
    return Adapters(layers, replace, drop, settings, list(modules_to_save), changed_base=changed)


def adapters_from_peft(path: str | Path, keys: Keys, *, tied_keys: Iterable[str] = ()) -> Adapters:
    """The adapters of a PEFT LoRA directory (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    config, weights = read_adapter(path)
    resolved = resolve_adapter_settings({}, config)
    settings = LoRASpec(
        int(resolved["r"]), float(resolved["alpha"]), float(config.get("lora_dropout") or 0.0),
        use_rslora=bool(resolved["use_rslora"]), use_dora=bool(resolved["use_dora"]),
    )  # fmt: skip
    state = {key.removeprefix(PEFT_PREFIX): value for key, value in weights.items()}
    with setting_names(ckpt_path="adapter_path"):
        return adapters_from_checkpoint(
            state, keys, settings, modules_to_save=resolved["modules_to_save"] or (), tied_keys=tied_keys,
            fan_in_fan_out=bool(config.get("fan_in_fan_out", False)), prefix="",
        )  # fmt: skip
