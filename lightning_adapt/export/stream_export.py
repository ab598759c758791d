"""The streamed export's entry points: ``<dirpath>/adapter`` + ``<dirpath>/merged`` written by streaming from the base
model's safetensors files through :mod:`lightning_adapt.export.stream_merge` (the engine): no model is built, no
merged copy is held; and the checks that say when a module or a checkpoint can be exported that way.

* :func:`export_module_streamed`: a live adapted module (``MergeOnSaveCallback`` at the end of fit): its
  adapters and trained tensors, merged into the weights read back from the directory it was loaded from;
  :func:`streaming_unavailable` says first why not, when it cannot (then :func:`~.exporter.export_model`).
* :func:`export_streamed`: any :class:`~lightning_adapt.export.stream_merge.Adapters` (from a Lightning
  checkpoint or a PEFT directory, :mod:`.adapter_sources`) into a base directory (``lightning-adapt export``).

Both write ``<dirpath>/adapter`` (PEFT's format) and ``<dirpath>/merged`` atomically, with the same tensors,
bit for bit, as the in-memory export of the same model, and report the memory they took.

Example:
    >>> keys = model_keys(read_index("base/"))  # doctest: +SKIP
    >>> adapters = adapters_from_peft("adapter/", keys)  # doctest: +SKIP
    >>> export_streamed("base/", "out/", adapters, ExportOptions(dtype="bf16"), keys=keys)  # doctest: +SKIP
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_adapt.adapters.checkpoint import FINGERPRINT_KEY
from lightning_adapt.adapters.delta import lora_layers
from lightning_adapt.adapters.lora import LoRALinear, lora_modules
from lightning_adapt.adapters.spec import LoRASpec
from lightning_adapt.atomic import atomic_directory, check_free_space, check_target
from lightning_adapt.errors import ExportError
from lightning_adapt.export.gguf_export import merged_to_gguf
from lightning_adapt.export.merged_state import check_tied_adapters
from lightning_adapt.export.options import ExportOptions
from lightning_adapt.export.original import source_dir
from lightning_adapt.export.peft_format import (
    PEFT_PREFIX,
    ModelFiles,
    changed_base_settings,
    export_root,
    peft_config,
    write_adapter,
    write_adapter_files,
    write_model_files,
)
from lightning_adapt.export.report import ExportResult, memory_meter, merge_report
from lightning_adapt.export.safetensors_io import (
    SMALLER_DTYPE_FIX,
    SourceWeights,
    StoredTensor,
    model_keys,
    parse_size,
    read_index,
    safetensors_files,
    written_bytes,
)
from lightning_adapt.export.stream_merge import Adapters, OnMerge, adapters_from_module, module_mismatch, stream_merge
from lightning_adapt.layers import DTYPES, quantized_layers
from lightning_adapt.naming import select
from lightning_adapt.quantize import QuantPlan

__all__ = [
    "StreamSource",
    "base_model_prefix_of",
    "checkpoint_source",
    "checkpoint_streaming_unavailable",
    "export_module_streamed",
    "export_streamed",
    "is_hf_safetensors_dir",
    "peft_writer",
    "stream_source",
    "streaming_unavailable",
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
    argument: str = "dirpath",
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
        argument: the name of ``dirpath`` in error messages.
    """
    options = options or ExportOptions()
    target, source = Path(dirpath), Path(source_path)
    check_target(target, options.overwrite, argument)
    keys = keys if keys is not None else model_keys(read_index(source))
    dtype = DTYPES[options.dtype] if options.dtype else None
    kept = ((stored.shape, stored.dtype) for key, stored in keys.items() if key not in adapters.drop)
    check_free_space(target, written_bytes(kept, dtype), argument, SMALLER_DTYPE_FIX)
    result = ExportResult(target, streamed=True)
    with memory_meter(options.measure_memory) as meter, atomic_directory(target, options.overwrite, argument) as tmp:
        if write_peft is not None:
            write_peft(tmp / "adapter")
            result.adapter = target / "adapter"
        (tmp / "merged").mkdir()
        shard = parse_size(options.max_shard_size)
        stats = stream_merge(keys, tmp / "merged", adapters, dtype, shard, on_merge=on_merge, argument=argument)
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
    to_save = _selected([n for n in module_names if n], adapters.modules_to_save)
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


# --------------------------------------------------------------------------- a live module


def _selected(names: list[str], modules_to_save: Sequence[str]) -> list[str]:
    return select(names, list(modules_to_save), "modules_to_save") if modules_to_save else []


@dataclass(frozen=True)
class StreamSource:
    """Where a live module's merge streams from: its source directory and that directory's tensors under the
    model's names (every header is read once, here, and serves the whole export)."""

    path: Path
    keys: dict[str, StoredTensor]


def streaming_unavailable(
    module: nn.Module, options: ExportOptions, source_path: str | Path | None = None
) -> str | None:
    """Why ``module`` cannot be exported by streaming from its source files (see :func:`stream_source`)."""
    found = stream_source(module, options, source_path)
    return found if isinstance(found, str) else None


def stream_source(
    module: nn.Module, options: ExportOptions, source_path: str | Path | None = None
) -> StreamSource | str:
    """The files ``module``'s export streams from, or why it cannot (then it is merged in memory): it can for a
    Hugging Face model with LoRA layers, loaded from a safetensors directory that holds every frozen weight it has
    (names and shapes), and not ``merge_base='dequantized'`` on 4-bit layers."""
    _, root, hf = export_root(module)
    if not hf:
        return "the module holds no Hugging Face model (its state dict keeps the module's own key names)"
    if not lora_modules(root):
        return "the model has no LoRA layers: nothing to merge"
    if other := [n for n, layer in lora_layers(root) if not isinstance(layer, LoRALinear)]:
        return f"{other[0]!r} is a conv/embedding/attention adapter, which only the in-memory merge folds"
    if options.merge_base == "dequantized" and quantized_layers(root):
        return "merge_base='dequantized' merges into the live 4-bit layers"
    path = source_dir(module, root, source_path)
    if not is_hf_safetensors_dir(path):
        return f"its source {str(path) if path else None!r} is not a Hugging Face directory of safetensors"
    keys = model_keys(read_index(str(path)), str(getattr(root, "base_model_prefix", "") or ""))
    mismatch = module_mismatch(root, keys)
    return (
        StreamSource(Path(str(path)), keys)
        if mismatch is None
        else f"{path} does not hold this model's frozen weights: {mismatch}"
    )


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
    if not any(isinstance(spec, LoRASpec) for spec in specs):
        return "the recipe has no lora: (full fine-tuning): there is no adapter to merge into the source files"
    if merge_base == "dequantized" and any(isinstance(spec, QuantPlan) for spec in specs):
        return "merge_base='dequantized' merges into the live 4-bit layers"
    path = checkpoint_source(module)
    if not is_hf_safetensors_dir(path):
        return f"the model's source {str(path) if path else None!r} is not a Hugging Face directory of safetensors"
    if FINGERPRINT_KEY not in state_dict:
        return "the checkpoint is not adapter-only (adapter_only_checkpoint: false): its trained tensors cannot be told from the base"
    return None


def export_module_streamed(
    module: nn.Module,
    dirpath: str | Path,
    options: ExportOptions | None = None,
    source: StreamSource | None = None,
    **extras: Any,
) -> ExportResult:
    """:func:`~lightning_adapt.export.exporter.export_model`'s output for a module that has a :func:`stream_source`
    (``source``: found already), streamed: the live adapters and trained tensors merged into the weights read back
    from the source directory (default dtype: each tensor's dtype in the live model). With quantized layers, the
    QLoRA report is computed on the live model as ``export_model`` does.

    ``extras``: ``export_model``'s keyword arguments (``modules_to_save``, ``source_path``, ``tokenizer``,
    ``probe``, ``argument``), with the same meaning and defaults.
    """
    options = options or ExportOptions()
    modules_to_save: Sequence[str] = extras.get("modules_to_save", ())
    source_path: str | Path | None = extras.get("source_path")
    tokenizer, probe, argument = extras.get("tokenizer"), extras.get("probe"), str(extras.get("argument", "dirpath"))
    if unknown := set(extras) - {"modules_to_save", "source_path", "tokenizer", "probe", "argument"}:
        raise TypeError(f"export_module_streamed: unexpected arguments {sorted(unknown)}")
    _, root, _ = export_root(module)
    found = source or stream_source(module, options, source_path)
    if isinstance(found, str):
        raise ExportError(f"source_path={source_path!r}: the export cannot stream: {found}.")
    check_tied_adapters(root)
    path, keys = found.path, found.keys
    to_save = _selected([n for n, _ in root.named_modules() if n], modules_to_save)
    result = export_streamed(
        str(path), dirpath, adapters_from_module(root, keys, to_save), options, keys=keys,
        files=ModelFiles.of(root, tokenizer),
        write_peft=lambda out: write_adapter(root, out, to_save, str(path)), argument=argument,
    )  # fmt: skip
    if quantized_layers(root):  # the originals of the quantized layers: in the headers read above
        result.report = merge_report(root, SourceWeights(path, tensors=keys), probe)
    return result
