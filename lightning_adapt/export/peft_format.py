"""The Hugging Face / PEFT layout of an adapted model. Pure torch + safetensors (no Lightning, no peft).

:func:`export_root` finds the ``transformers.PreTrainedModel`` inside a module (keys are relative to it);
:func:`write_adapter` writes what ``peft.PeftModel.from_pretrained(base, dirpath)`` reads::

    adapter_config.json         LoraConfig fields (one r / alpha / dropout / rslora / dora for all layers)
    adapter_model.safetensors   base_model.model.<layer>.lora_A.weight          (r, in)      convs: (r, in, *k)
                                base_model.model.<layer>.lora_B.weight          (out, r)     convs: (out, r, 1..)
                                base_model.model.<layer>.lora_magnitude_vector  (out,)   DoRA only
                                base_model.model.<emb>.lora_embedding_A / _B    (r, num) / (dim, r)
                                base_model.model.<mha>.lora_A.weight, <mha>.base_layer.out_proj.lora_A.weight, ...
                                base_model.model.<module>.<param>               modules_to_save

Every adapter parameter is written under its own name (the wrappers use PEFT's names). For an adapted
``nn.MultiheadAttention`` PEFT computes something else (:func:`no_peft_layout`): the export then writes no
adapter directory (one line says why) and the merged model still.

Reading such a directory back: :func:`read_adapter`, :func:`resolve_adapter_settings`, :func:`load_adapter_weights`.

Example:
    >>> prefix, root, is_hf = export_root(pl_module)  # doctest: +SKIP
    >>> write_adapter(root, Path("out/adapter"), ["classifier"], "HuggingFaceTB/SmolLM2-135M")  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lightning_adapt.adapters.delta import lora_layers
from lightning_adapt.adapters.lora import LoRALinear, lora_modules
from lightning_adapt.adapters.spec import LoRASpec
from lightning_adapt.errors import SETTING, ConfigError, ExportError
from lightning_adapt.layers import adapter_param_ids, is_conv1d
from lightning_adapt.naming import select

__all__ = [
    "PEFT_PREFIX",
    "TOKENIZER_FILES",
    "ModelFiles",
    "adapter_config",
    "adapter_state",
    "export_root",
    "find_hf_model",
    "load_adapter_weights",
    "modules_to_save_names",
    "peft_config",
    "read_adapter",
    "resolve_adapter_settings",
    "write_adapter",
    "write_adapter_files",
    "write_model_files",
]

PEFT_PREFIX = "base_model.model."
_TASK_TYPES = {
    "ForCausalLM": "CAUSAL_LM",
    "ForSequenceClassification": "SEQ_CLS",
    "ForTokenClassification": "TOKEN_CLS",
    "ForQuestionAnswering": "QUESTION_ANS",
}


def _loaded_transformers_class(module: str, name: str) -> type[nn.Module] | None:
    """``transformers`` module class ``module.name`` if that module is already imported, else ``None``.

    Never imports it (seconds): until it is imported, no object can be an instance of its classes.
    """
    loaded = sys.modules.get(module)
    cls = getattr(loaded, name, None)
    return cls if isinstance(cls, type) and issubclass(cls, nn.Module) else None


def find_hf_model(module: nn.Module) -> tuple[str, nn.Module] | None:
    """``(dotted name, model)`` of the outermost ``transformers.PreTrainedModel`` in ``module``, if any."""
    pretrained = _loaded_transformers_class("transformers", "PreTrainedModel")
    if pretrained is None:
        return None
    return next(((n, m) for n, m in module.named_modules() if isinstance(m, pretrained)), None)


def export_root(module: nn.Module) -> tuple[str, nn.Module, bool]:
    """``(prefix, root, is_hf)``: the HF model inside ``module`` (keys relative to it), else ``module``.

    ``prefix`` is the HF model's dotted name plus ``"."`` (``""`` when it is ``module`` itself or absent).
    """
    found = find_hf_model(module)
    if found is None:
        return "", module, False
    name, model = found
    return (name + "." if name else ""), model, True


#: Tokenizer files copied from the source directory when no tokenizer object is given.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
    "vocab.txt", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)  # fmt: skip


@dataclass(frozen=True)
class ModelFiles:
    """What an export writes next to the merged weights of a Hugging Face model; ``None`` fields come from the
    source directory.

    Args:
        config: a ``transformers`` config to save (else the source's ``config.json``); either way without
            ``quantization_config`` and with the merged dtype.
        architecture: the model class written to ``architectures`` (else the config's own).
        generation_config: saved as is (else the source's ``generation_config.json``, if any, is copied).
        tokenizer: saved with ``save_pretrained`` (else the source's tokenizer files are copied).
    """

    config: Any = None
    architecture: str | None = None
    generation_config: Any = None
    tokenizer: Any = None

    @classmethod
    def of(cls, root: nn.Module, tokenizer: Any = None) -> ModelFiles:
        """The files of the live Hugging Face model ``root``: its config, class, generation config (a model
        that generates) and ``tokenizer``."""
        model: Any = root
        can_generate = callable(getattr(model, "can_generate", None)) and model.can_generate()
        generation = getattr(model, "generation_config", None) if can_generate else None
        return cls(model.config, type(root).__name__, generation, tokenizer)


def write_model_files(out: Path, files: ModelFiles, dtype: torch.dtype | None, source: Path | None = None) -> None:
    """``config.json`` (no ``quantization_config``: the merged weights are plain floats, never re-quantized on load;
    ``dtype`` as the merged weights'), the generation config and the tokenizer into ``out``, each from ``files``
    or else copied from ``source``."""
    name = str(dtype).removeprefix("torch.") if dtype is not None else None
    if files.config is None and source is not None:
        config = json.loads((source / "config.json").read_text())
        config.pop("quantization_config", None)
        config.update({"architectures": [files.architecture]} if files.architecture else {})
        if name:
            config.update({"dtype": name, **({"torch_dtype": name} if "torch_dtype" in config else {})})
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    elif files.config is not None:
        saved = copy.deepcopy(files.config)
        if hasattr(saved, "quantization_config"):
            del saved.quantization_config
        if files.architecture:
            saved.architectures = [files.architecture]
        saved.dtype = dtype or saved.dtype
        saved.save_pretrained(out)
    if files.generation_config is not None:
        files.generation_config.save_pretrained(out)
    elif source is not None and (source / "generation_config.json").is_file():
        shutil.copy(source / "generation_config.json", out / "generation_config.json")
    if files.tokenizer is not None:
        files.tokenizer.save_pretrained(out)
    elif source is not None:
        for file in (f for f in TOKENIZER_FILES if (source / f).is_file()):
            shutil.copy(source / file, out / file)


def _peft_targets(module_names: list[str], names: list[str]) -> list[str]:
    """Leaf names when they select exactly the adapted layers (PEFT's suffix rule), else full names."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    selected = {n for n in module_names if n.rsplit(".", 1)[-1] in leaves}
    return leaves if selected == set(names) else sorted(names)


def peft_config(
    settings: LoRASpec,
    layer_names: list[str],
    module_names: list[str],
    modules_to_save: list[str],
    base_model_name_or_path: str | None,
    architecture: str,
    fan_in_fan_out: bool,
) -> dict[str, Any]:
    """PEFT ``LoraConfig`` fields for adapters with ``settings`` (its r, alpha, dropout, rslora, dora) on
    ``layer_names`` of a model whose modules are ``module_names`` and whose class is ``architecture``."""
    alpha = settings.alpha
    task = next((t for suffix, t in _TASK_TYPES.items() if architecture.endswith(suffix)), None)
    return {
        "peft_type": "LORA",
        "task_type": task,
        "base_model_name_or_path": base_model_name_or_path,
        "r": settings.r,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": float(settings.dropout),
        "target_modules": _peft_targets(module_names, layer_names),
        "modules_to_save": modules_to_save or None,
        "use_rslora": settings.use_rslora,
        "use_dora": settings.use_dora,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
    }


def adapter_config(root: nn.Module, modules_to_save: list[str], base_model_name_or_path: str | None) -> dict[str, Any]:
    """PEFT ``LoraConfig`` fields describing the adapters in ``root`` (one r/alpha for all layers).

    Raises:
        ExportError: the adapted layers differ in r, alpha, rslora, dora or dropout.
    """
    layers: list[tuple[str, Any]] = lora_layers(root)
    settings = {(m.r, m.alpha, getattr(m.lora_dropout, "p", 0.0), m.use_rslora, m.use_dora) for _, m in layers}
    if len(settings) != 1:
        raise ExportError(f"the adapted layers use different (r, alpha, dropout, rslora, dora): {sorted(settings)}.")
    r, alpha, dropout, use_rslora, use_dora = settings.pop()
    spec = LoRASpec(r, alpha, dropout, use_rslora=use_rslora, use_dora=use_dora)
    return peft_config(
        changed_base_settings(spec) if _changed(root) else spec,
        [n for n, _ in layers],
        [n for n, _ in root.named_modules()],
        modules_to_save,
        base_model_name_or_path,
        type(root).__name__,
        any(is_conv1d(m.base_layer) for _, m in lora_modules(root)),
    )


def adapter_state(root: nn.Module, modules_to_save: list[str]) -> dict[str, torch.Tensor]:
    """PEFT keys: ``base_model.model.<adapter parameter>`` (``<layer>.lora_A.weight``, ``lora_magnitude_vector``,
    ``lora_embedding_A``, ...) and ``base_model.model.<module>.<param>`` for ``modules_to_save``; CPU tensors,
    ``root`` untouched."""
    ids = adapter_param_ids(root)
    state = {
        f"{PEFT_PREFIX}{key}": param.detach().cpu().contiguous()
        for key, param in root.named_parameters()
        if id(param) in ids
    }
    for name, layer in _changed(root):  # on the original weight: the rank-2r [A; A0], [B, -B0]
        lora_a, lora_b = layer.original_factors()
        state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = lora_a.detach().cpu().contiguous()
        state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = lora_b.detach().cpu().contiguous()
    for name in modules_to_save:
        for key, value in root.get_submodule(name).state_dict().items():
            state[f"{PEFT_PREFIX}{name}.{key}"] = value.detach().cpu().clone()
    return state


def write_adapter_files(out: Path, config: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    """Create ``out`` and write ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT's format) into it."""
    out.mkdir(parents=True)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(state, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})


def modules_to_save_names(names: list[str], modules_to_save: Sequence[str]) -> list[str]:
    """The module names ``modules_to_save`` entries select (naming rules of :mod:`lightning_adapt.naming`)."""
    return select(names, list(modules_to_save), "modules_to_save") if modules_to_save else []


def changed_base_settings(settings: LoRASpec) -> LoRASpec:
    """The PEFT settings of adapters whose init (PiSSA / OLoRA / LoftQ) changed the base, written as the rank-2r
    LoRA ``[A; A0]``, ``[B, -B0]`` on the original weight (PEFT's own conversion): ``r`` doubled, ``alpha`` so that
    the scaling stays (``2·alpha``; ``√2·alpha`` with rsLoRA)."""
    return replace(settings, r=2 * settings.r, alpha=settings.alpha * (math.sqrt(2) if settings.use_rslora else 2))


def _changed(root: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(name, layer) for name, layer in lora_modules(root) if layer.changes_base]


def no_peft_layout(root: nn.Module) -> str | None:
    """Why PEFT could not reproduce ``root``'s adapters, else ``None``: an adapted ``nn.MultiheadAttention``
    (PEFT 0.21 merges on forward but adds the ``out_proj`` update twice; separate q/k/v it cannot adapt at all)."""
    attention = [n for n, m in lora_layers(root) if isinstance(getattr(m, "base_layer", None), nn.MultiheadAttention)]
    changed = {n for n, _ in _changed(root)}
    if changed and (kept := [n for n, _ in lora_layers(root) if n not in changed]):
        return f"{kept[0]!r} keeps its base while other layers' init changed theirs: their PEFT ranks would differ"
    if attention:
        return (
            f"{attention[0]!r} is an adapted nn.MultiheadAttention, whose PEFT layer (experimental) adds the "
            "out_proj update twice and so would not reproduce these outputs"
        )
    return None


def write_adapter(root: nn.Module, out: Path, modules_to_save: list[str], base_model_name_or_path: str | None) -> None:
    """Create ``out`` and write the adapters of ``root`` in PEFT's format into it."""
    config = adapter_config(root, modules_to_save, base_model_name_or_path)
    write_adapter_files(out, config, adapter_state(root, modules_to_save))


# --------------------------------------------------------------------------- starting from a PEFT adapter

#: Our LoRA setting -> its name in PEFT's adapter_config.json (when neither sets it: :class:`LoRASpec`'s default).
ADAPTER_SETTINGS = {
    "r": "r", "alpha": "lora_alpha", "target_modules": "target_modules", "use_rslora": "use_rslora",
    "use_dora": "use_dora", "modules_to_save": "modules_to_save",
}  # fmt: skip


def _same(ours: object, theirs: object) -> bool:
    if isinstance(ours, list | tuple) or isinstance(theirs, list | tuple):
        as_set = lambda v: {v} if isinstance(v, str) else set(v or ())  # noqa: E731
        return as_set(ours) == as_set(theirs)
    return ours == theirs


def resolve_adapter_settings(explicit: dict[str, object], adapter_config: dict[str, Any] | None) -> dict[str, Any]:
    """Fill the settings the user left ``None`` from ``adapter_config`` (else the defaults); a setting the
    user gave that disagrees with the adapter is an error (all listed at once)."""
    resolved: dict[str, Any] = {}
    problems = []
    for ours, theirs in ADAPTER_SETTINGS.items():
        default = getattr(LoRASpec(), ours)
        value, from_adapter = explicit.get(ours), (adapter_config or {}).get(theirs)
        if adapter_config is not None and value is not None and not _same(value, from_adapter):
            problems.append(f"{ours}={value!r} but the adapter has {theirs}={from_adapter!r}")
        resolved[ours] = value if value is not None else (from_adapter if from_adapter is not None else default)
    unsupported = {k: (adapter_config or {}).get(k) for k in ("rank_pattern", "alpha_pattern", "layers_to_transform")}
    problems += [f"the adapter uses {k}={v!r}, which is not supported" for k, v in unsupported.items() if v]
    if adapter_config is not None and adapter_config.get("bias", "none") != "none":
        problems.append(f"the adapter trains biases (bias={adapter_config['bias']!r}); only bias='none' is supported")
    if problems:
        raise ConfigError(
            f"{SETTING}: " + "; ".join(problems) + ". Fix: leave these settings unset to take the adapter's values.",
            setting="adapter_path",
        )
    return resolved


def read_adapter(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(adapter_config.json, weights)`` of a PEFT LoRA adapter directory (safetensors only)."""
    directory = Path(path)
    config_file, weights = directory / "adapter_config.json", directory / "adapter_model.safetensors"
    if not (config_file.is_file() and weights.is_file()):
        raise ExportError(
            f"{SETTING}={str(path)!r}: expected a PEFT adapter directory with adapter_config.json and "
            "adapter_model.safetensors. Fix: pass the directory PeftModel.save_pretrained (or export) wrote.",
            setting="adapter_path",
        )
    config: dict[str, Any] = json.loads(config_file.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ExportError(
            f"{SETTING}={str(path)!r}: peft_type={config.get('peft_type')!r}; only LORA is supported.",
            setting="adapter_path",
        )
    return config, load_file(str(weights))


@torch.no_grad()
def load_adapter_weights(module: nn.Module, weights: dict[str, torch.Tensor]) -> None:
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
    adapter_ids = adapter_param_ids(root)
    adapter_keys = {k for k, p in own.items() if id(p) in adapter_ids}
    missing = sorted(adapter_keys - set(mapped))
    if unknown or shapes or missing:
        raise ExportError(
            f"{SETTING}: the adapter does not fit the injected model (unknown keys {unknown[:3]}, shape mismatches "
            f"{shapes[:3]}, missing {missing[:3]}). Fix: use the base model and r/target_modules it was trained with.",
            setting="adapter_path",
        )
    for key, value in mapped.items():
        own[key].copy_(value)
