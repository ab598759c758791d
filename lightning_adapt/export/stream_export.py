"""The streamed export: ``<dirpath>/adapter`` + ``<dirpath>/merged`` written by streaming a checkpoint's adapters
into the base model's safetensors files through :mod:`lightning_adapt.export.stream_merge` (the engine): no model
is built, no merged copy is held (``lightning-adapt export``, and ``merge:`` under FSDP2, where no rank holds the
whole model); and the check that says when a checkpoint can be exported that way.

:func:`export_streamed` takes any :class:`~lightning_adapt.export.stream_merge.Adapters` (from a Lightning
checkpoint or a PEFT directory, :mod:`.adapter_sources`) and writes ``<dirpath>/adapter`` (PEFT's format) and
``<dirpath>/merged`` atomically, with the same tensors, bit for bit, as the export of the live trained model
(:func:`~.exporter.export_model`), and reports the memory it took.

Example:
    >>> keys = model_keys(read_index("base/"))  # doctest: +SKIP
    >>> adapters = adapters_from_peft("adapter/", keys)  # doctest: +SKIP
    >>> export_streamed("base/", "out/", adapters, ExportOptions(dtype="bf16"), keys=keys)  # doctest: +SKIP
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from lightning_adapt.adapters.checkpoint import FINGERPRINT_KEY
from lightning_adapt.adapters.spec import LoRASpec
from lightning_adapt.atomic import atomic_directory, check_free_space, check_target
from lightning_adapt.errors import ExportError, setting_names
from lightning_adapt.export.adapter_sources import adapters_from_checkpoint, unfolded_adapter_keys
from lightning_adapt.export.exporter import ExportOptions
from lightning_adapt.export.gguf_export import check_gguf, merged_to_gguf
from lightning_adapt.export.original import base_model_name
from lightning_adapt.export.peft_format import (
    PEFT_PREFIX,
    ModelFiles,
    changed_base_settings,
    export_root,
    modules_to_save_names,
    peft_config,
    write_adapter_files,
    write_model_files,
)
from lightning_adapt.export.report import ExportResult, RequantizedGap, memory_meter
from lightning_adapt.export.safetensors_io import (
    SMALLER_DTYPE_FIX,
    StoredTensor,
    model_keys,
    parse_size,
    read_index,
    safetensors_files,
    written_bytes,
)
from lightning_adapt.export.stream_merge import Adapters, OnMerge, stream_merge
from lightning_adapt.layers import DTYPES
from lightning_adapt.models import read_hf_config
from lightning_adapt.quantize import QuantPlan

__all__ = [
    "base_model_prefix_of",
    "checkpoint_source",
    "checkpoint_streaming_unavailable",
    "export_checkpoint_streamed",
    "export_streamed",
    "is_hf_safetensors_dir",
    "peft_writer",
    "uses_conv1d",
]


def is_hf_safetensors_dir(path: str | Path | None) -> bool:
    """Whether ``path`` is a Hugging Face model directory with safetensors weights (``config.json`` too)."""
    return bool(path) and (Path(str(path)) / "config.json").is_file() and bool(safetensors_files(str(path)))


def base_model_prefix_of(config: Any) -> str:
    """The ``base_model_prefix`` of the model class ``config`` belongs to (``bert``, ``model``), looked up
    in ``transformers``' auto mapping without building anything; ``""`` when unknown."""
    try:
        from transformers import MODEL_MAPPING

        return str(getattr(MODEL_MAPPING[type(config)], "base_model_prefix", "") or "")
    except (ImportError, KeyError, ValueError):
        return ""


@setting_names(target="dirpath")
def export_streamed(
    source_path: str | Path,
    dirpath: str | Path,
    adapters: Adapters,
    options: ExportOptions | None = None,
    *,
    keys: Mapping[str, StoredTensor] | None = None,
    files: ModelFiles | None = None,
    write_peft: Callable[[Path], None] | None = None,
    on_merge: OnMerge | None = None,
) -> ExportResult:
    """Write ``<dirpath>/merged`` tensor by tensor from the safetensors files of ``source_path`` (see
    :mod:`lightning_adapt.export.stream_merge`) and, with ``write_peft``, ``<dirpath>/adapter``; atomically.
    No model is built: the peak is one tensor's merge, reported in ``result.memory`` (``options.measure_memory``).

    Args:
        source_path: the base model's Hugging Face directory (``config.json`` + safetensors).
        dirpath: target directory; must be absent or empty unless ``options.overwrite``.
        adapters: what to merge (:func:`~lightning_adapt.export.stream_merge.adapters_from_module`,
            :mod:`lightning_adapt.export.adapter_sources`); keys as in ``keys``.
        options: dtype (default: each tensor's stored dtype, or ``adapters.dtypes``), shard size, overwrite.
        keys: the source's tensors under the model's names (default: its keys as stored).
        files: config, generation config and tokenizer to write (default: copied from the source).
        write_peft: writes the PEFT adapter directory it is given.
        on_merge: per adapted layer, see :func:`~lightning_adapt.export.stream_merge.stream_merge`.
    """
    options = options or ExportOptions()
    target, source = Path(dirpath), Path(source_path)
    check_target(target, options.overwrite)
    keys = keys if keys is not None else model_keys(read_index(source))
    dtype = DTYPES[options.dtype] if options.dtype else None
    kept = ((stored.shape, stored.dtype) for key, stored in keys.items() if key not in adapters.drop)
    check_free_space(target, written_bytes(kept, dtype), SMALLER_DTYPE_FIX)
    result = ExportResult(target, streamed=True)
    with memory_meter(options.measure_memory) as meter, atomic_directory(target, options.overwrite) as tmp:
        if write_peft is not None:
            write_peft(tmp / "adapter")
            result.adapter = target / "adapter"
        (tmp / "merged").mkdir()
        shard = parse_size(options.max_shard_size)
        stats = stream_merge(keys, tmp / "merged", adapters, dtype, shard, on_merge=on_merge)
        write_model_files(tmp / "merged", files or ModelFiles(), dtype or stats.first_float_dtype, source)
        result.merged = target / "merged"
        if options.format == "gguf":  # llama.cpp's files from the merged ones, which they replace
            result.gguf, result.merged = [target / name for name in merged_to_gguf(tmp, options.gguf_type)], None
    result.dropped_tied = stats.dropped
    if meter is not None:
        result.memory = meter.result(stats.largest_key, stats.largest_fp32_bytes, stats.model_bytes)
    return result


def peft_writer(
    adapters: Adapters, keys: Mapping[str, StoredTensor], base_model_name_or_path: str | None, architecture: str
) -> Callable[[Path], None]:
    """Writes the PEFT adapter directory of ``adapters`` (read from a checkpoint: ``settings`` required)
    as :func:`~lightning_adapt.export.peft_format.write_adapter` does for a live model."""
    settings = adapters.settings
    if settings is None:
        raise ExportError("peft_writer: the adapters carry no LoRA settings (r, alpha, ...).")
    settings = changed_base_settings(settings) if adapters.changed_base else settings
    keys_seen = [*keys, *adapters.replace]
    module_names = sorted({""} | {key.rsplit(".", i)[0] for key in keys_seen for i in range(1, key.count(".") + 1)})
    to_save = modules_to_save_names([n for n in module_names if n], adapters.modules_to_save)
    state: dict[str, torch.Tensor] = {}
    for name, layer in adapters.layers.items():
        state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.detach().cpu().contiguous()
        state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.detach().cpu().contiguous()
        if layer.magnitude is not None:
            state[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = layer.magnitude.detach().cpu()
    for name in to_save:
        for key, value in adapters.replace.items():
            if key.startswith(name + "."):
                state[PEFT_PREFIX + key] = value.detach().cpu().clone()
    config = peft_config(
        settings, list(adapters.layers), module_names, to_save, base_model_name_or_path, architecture,
        any(layer.conv1d for layer in adapters.layers.values()),
    )  # fmt: skip
    return lambda out: write_adapter_files(out, config, state)


def uses_conv1d(config: Any) -> bool:
    """Whether the model class of ``config`` stores its linear weights ``(in, out)``: its modeling module uses
    ``transformers``' ``Conv1D`` (GPT-2). Decides only adapters whose every layer is square (the shapes say
    it otherwise); ``False`` when unknown."""
    try:
        from transformers import MODEL_MAPPING

        return getattr(sys.modules.get(MODEL_MAPPING[type(config)].__module__), "Conv1D", None) is not None
    except (ImportError, KeyError, ValueError):
        return False


def checkpoint_source(module: Any) -> Path | None:
    """The Hugging Face directory ``module`` loads its weights from: its ``source_path``, else its
    ``model_name_or_path`` hyperparameter when that is a directory; ``None`` when neither."""
    path = getattr(module, "source_path", None) or (getattr(module, "hparams", None) or {}).get("model_name_or_path")
    return Path(path) if path and Path(path).is_dir() else None


def checkpoint_streaming_unavailable(
    module: Any, state_dict: dict[str, Any], specs: list[object], merge_base: str
) -> str | None:
    """Why ``lightning-adapt export`` must rebuild the model and merge in memory; ``None`` when the checkpoint
    can be merged into the module's source files as they stream by."""
    loras = [spec for spec in specs if isinstance(spec, LoRASpec)]
    if not loras:
        return "the recipe has no lora: (full fine-tuning): there is no adapter to merge into the source files"
    if any(spec.target_parameters for spec in loras):
        return "lora: target_parameters adapts parameters (fused experts) only the live model's merge folds"
    if merge_base == "dequantized" and any(isinstance(spec, QuantPlan) for spec in specs):
        return "merge_base='dequantized' merges into the live 4-bit layers"
    path = checkpoint_source(module)
    if not is_hf_safetensors_dir(path):
        return f"the model's source {str(path) if path else None!r} is not a Hugging Face directory of safetensors"
    if FINGERPRINT_KEY not in state_dict:
        return "the checkpoint is not adapter-only (adapter_only_checkpoint: false): its trained tensors cannot be told from the base"
    if unfolded := unfolded_adapter_keys(state_dict):
        return f"{unfolded[0]!r} is an adapter only the live model's merge folds (target_parameters)"
    return None


def export_checkpoint_streamed(
    module: Any,
    state_dict: Mapping[str, Any],
    lora: LoRASpec,
    plan: QuantPlan | None,
    dirpath: str | Path,
    options: ExportOptions,
    tokenizer: Any = None,
) -> ExportResult:
    """Export an adapter-only checkpoint's ``state_dict`` without building the model: its adapters are merged into
    ``module``'s source files as they stream by (check :func:`checkpoint_streaming_unavailable` first). ``lora``:
    the run's settings; with a ``plan`` (QLoRA) the merge report compares original and dequantized merges of the
    adapted layers, each re-quantized as it streams by. ``module`` may be unbuilt: a task that builds its model in
    ``__init__`` gives its config and class, else its ``hf_config``, else the source's ``config.json``.
    """
    path = str(checkpoint_source(module))
    _, root, hf = export_root(module)
    built = root if hf else None
    config = getattr(built, "config", None) or getattr(module, "hf_config", None) or read_hf_config(Path(path))
    if options.format == "gguf":
        check_gguf(config)  # before the merge: an architecture GGUF cannot hold is refused first
    prefix = base_model_prefix_of(config) or str(getattr(built, "base_model_prefix", "") or "")
    keys = model_keys(read_index(path), prefix)
    adapters = adapters_from_checkpoint(
        state_dict, keys, lora,
        modules_to_save=lora.modules_to_save, fan_in_fan_out=uses_conv1d(config),
        tied_keys=["lm_head.weight"] if getattr(config, "tie_word_embeddings", False) else [],
    )  # fmt: skip
    architecture = type(built).__name__ if built is not None else (getattr(config, "architectures", None) or [""])[0]
    gap = RequantizedGap(plan) if plan is not None else None
    result = export_streamed(
        path, dirpath, adapters, options, keys=keys, on_merge=gap,
        files=ModelFiles(config, architecture or None, None, tokenizer),
        write_peft=peft_writer(adapters, keys, base_model_name(module, path), architecture),
    )  # fmt: skip
    result.report = gap.report() if gap is not None and gap.count else None
    return result
