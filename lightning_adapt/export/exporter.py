"""Export an adapted model as a PEFT-format adapter and as a merged model. Pure torch + safetensors.

Both export paths write, atomically (a temp dir next to ``dirpath``, then ``os.replace``)::

    <dirpath>/adapter/adapter_config.json, adapter_model.safetensors   peft.PeftModel.from_pretrained(base, ...)
    <dirpath>/merged/config.json, model.safetensors (+ shards, index)  AutoModel*.from_pretrained(...)

Each adapted layer is written under its original key as ``W' = W + scale·B@A`` (DoRA:
``m·(W+ΔW)/‖W+ΔW‖_row``), computed in fp32 and cast to the output dtype last; ``modules_to_save`` are
written as trained.

* :func:`export_model` (this module) merges **in memory**, from the module's own weights: for a module
  that holds no Hugging Face model ``merged/`` is a safetensors state dict with the module's original key
  names that loads ``strict=True`` into the un-adapted module; QLoRA with ``merge_base='dequantized'``
  merges into the live 4-bit layers. Peak: the model plus one tensor.
* :func:`~lightning_adapt.export.stream_export.export_streamed` **streams** a checkpoint's adapters into the base
  model's safetensors files, tensor by tensor, and builds no model (see :mod:`lightning_adapt.export.stream_merge`).

QLoRA: by default the merge uses the original full-precision weights re-read (tensor by tensor) from
the checkpoint the model was loaded from, not the dequantized NF4 copy; the merged model is never
re-quantized. :class:`MergeReport` says how far the two choices differ.

The parts: this module (:class:`ExportOptions`, :func:`export_model`), :mod:`.original` (the source of the
original weights), :mod:`.peft_format` (adapter layout, HF model lookup), :mod:`.merged_state` (the in-memory merged tensors),
:mod:`.stream_merge` (the streaming merge), :mod:`.report` (merge report, memory, :class:`ExportResult`),
:mod:`.safetensors_io` (streaming sharded writer, plain-read reader, atomic directories).

Example:
    >>> result = export_model(pl_module, "out/export", ExportOptions(dtype="bf16"))  # doctest: +SKIP
    >>> print(result.report.format())  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import nn

from lightning_adapt.adapters.delta import lora_layers
from lightning_adapt.atomic import atomic_directory, check_free_space, check_target
from lightning_adapt.errors import ExportError, setting_names
from lightning_adapt.export.gguf_export import merged_to_gguf
from lightning_adapt.export.merged_state import check_tied_adapters, merged_entries
from lightning_adapt.export.original import base_model_name, optional_source, source_dir, source_for
from lightning_adapt.export.peft_format import (
    PEFT_PREFIX,
    ModelFiles,
    export_root,
    modules_to_save_names,
    no_peft_layout,
    write_adapter,
    write_model_files,
)
from lightning_adapt.export.peft_parameters import no_parameter_layout, to_peft_parameters
from lightning_adapt.export.report import ExportResult, MergeReport, memory_meter, merge_report
from lightning_adapt.export.safetensors_io import (
    SMALLER_DTYPE_FIX,
    SourceWeights,
    parse_size,
    write_safetensors,
    written_bytes,
)
from lightning_adapt.layers import DTYPES

__all__ = [
    "DTYPES",
    "PEFT_PREFIX",
    "DTypeName",
    "ExportError",
    "ExportFormat",
    "ExportOptions",
    "ExportResult",
    "GGUFType",
    "MergeBase",
    "MergeReport",
    "check_target",
    "export_model",
    "export_root",
    "find_tokenizer",
    "make_probe",
    "merge_report",
    "modules_to_save_names",
    "source_for",
    "write_merged",
]

# --------------------------------------------------------------------------- how to export

MergeBase = Literal["original", "dequantized"]
DTypeName = Literal["fp32", "bf16", "fp16"]
ExportFormat = Literal["safetensors", "gguf"]
GGUFType = Literal["f32", "f16", "bf16", "q8_0"]


@dataclass(frozen=True)
class ExportOptions:
    """How to export.

    Args:
        merge_base: ``original``: merge quantized layers into the full-precision weights re-read from the
            source checkpoint; ``dequantized``: into the dequantized (e.g. NF4) weights held in memory.
        dtype: dtype of the merged floating tensors; ``None`` keeps each base tensor's own dtype.
        max_shard_size: above this size the merged weights are sharded (``model-0000k-of-0000n``).
        overwrite: replace an existing non-empty ``dirpath`` (atomically) instead of refusing.
        format: ``safetensors`` (``merged/``, for ``from_pretrained``) or ``gguf`` (``gguf/model-<type>.gguf`` and,
            for LoRA adapters llama.cpp can apply, ``gguf/adapter-f32.gguf``: llama.cpp, Ollama, LM Studio; Llama,
            Mistral and Qwen2 models). ``adapter/`` (PEFT's format) is written either way.
        gguf_type: with ``format='gguf'``: ``f32``, ``f16``, ``bf16`` or ``q8_0`` for the matrices (vectors f32).
        measure_memory: measure the export's peak resident memory (``ExportResult.memory``; a sampling thread
            runs while it writes): for a memory report or a benchmark, off otherwise.

    Raises:
        ExportError: every invalid option, listed at once.
    """

    merge_base: MergeBase = "original"
    dtype: DTypeName | None = None
    max_shard_size: int | str = "5GB"
    overwrite: bool = False
    format: ExportFormat = "safetensors"
    gguf_type: GGUFType = "f16"
    measure_memory: bool = False

    def __post_init__(self) -> None:
        problems = []
        if self.merge_base not in get_args(MergeBase):
            problems.append(f"merge_base={self.merge_base!r}: allowed {get_args(MergeBase)}.")
        if self.format not in get_args(ExportFormat):
            problems.append(f"format={self.format!r}: allowed {list(get_args(ExportFormat))}.")
        if self.gguf_type not in get_args(GGUFType):
            problems.append(f"gguf_type={self.gguf_type!r}: allowed {list(get_args(GGUFType))}, e.g. 'q8_0'.")
        if self.dtype is not None and self.dtype not in get_args(DTypeName):
            problems.append(f"dtype={self.dtype!r}: allowed {list(get_args(DTypeName))} or None (keep the base dtype).")
        try:
            if parse_size(self.max_shard_size) < 1:
                problems.append(f"max_shard_size={self.max_shard_size!r}: must be > 0, e.g. '5GB'.")
        except ExportError as err:
            problems.append(str(err))
        if problems:
            raise ExportError("Invalid export options:\n  - " + "\n  - ".join(problems))


# --------------------------------------------------------------------------- the merged model


def write_merged(
    root: nn.Module,
    out: Path,
    options: ExportOptions,
    source: SourceWeights | None,
    hf: bool,
    tokenizer: Any = None,
    *,
    target: Path | None = None,
    files_from: Path | None = None,
) -> list[str]:
    """Create ``out`` and write the merged model of ``root`` into it; returns the tied keys that were dropped.
    With ``target`` (where ``out`` will end up), first refuse if its file system lacks the space; ``files_from``:
    the source directory whose tokenizer (and generation config) files are copied when ``root`` has none."""
    check_tied_adapters(root)
    entries, dropped = merged_entries(
        root, source if options.merge_base == "original" else None, "drop" if hf else "copy"
    )
    dtype = DTYPES[options.dtype] if options.dtype else None
    if target is not None:
        needed = written_bytes(((e.shape, e.dtype) for e in entries), dtype)
        check_free_space(target, needed, SMALLER_DTYPE_FIX)
    out.mkdir(parents=True)
    write_safetensors(out, entries, dtype, parse_size(options.max_shard_size))
    if hf:
        first = next((p.dtype for p in root.parameters() if p.is_floating_point()), torch.float32)
        write_model_files(out, ModelFiles.of(root, tokenizer), dtype or first, files_from)
    return dropped


# --------------------------------------------------------------------------- the entry points


def find_tokenizer(*owners: Any) -> Any:
    """The first ``tokenizer`` attribute of ``owners`` that can be saved (``save_pretrained``), else ``None``."""
    for owner in owners:
        tokenizer = getattr(owner, "tokenizer", None)
        if callable(getattr(tokenizer, "save_pretrained", None)):
            return tokenizer
    return None


@setting_names(target="dirpath")
def export_model(
    module: nn.Module,
    dirpath: str | Path,
    options: ExportOptions | None = None,
    *,
    modules_to_save: Sequence[str] = (),
    source_path: str | Path | None = None,
    tokenizer: Any = None,
    probe: Callable[[], torch.Tensor] | None = None,
    original: SourceWeights | None = None,
) -> ExportResult:
    """Write ``<dirpath>/adapter`` (if ``module`` holds LoRA layers PEFT can load) and ``<dirpath>/merged``, atomically,
    merging tensor by tensor from ``module``'s own weights (see :func:`~.stream_export.export_streamed` for the
    merge of a checkpoint's adapters into the source files).

    Args:
        module: the adapted module (a LightningModule or any ``nn.Module``); it is not modified.
        dirpath: target directory; must be absent or empty unless ``options.overwrite``.
        options: merge base, dtype, shard size, overwrite.
        modules_to_save: fully trained modules (LoRASpec entries) saved with the adapter.
        source_path: checkpoint directory of the original weights (default: ``module.source_path``, then the
            HF model's ``name_or_path``); needed for ``merge_base='original'`` with quantized layers.
        tokenizer: saved next to a merged Hugging Face model.
        probe: a forward on a fixed batch, for the output difference in the merge report.
        original: the quantized layers' original weights, found already (:func:`~.original.optional_source`,
            whose headers are then not read again); ``None``: found here.

    Raises:
        ExportError: before anything is written, for a non-empty target or a missing/mismatched source.
    """
    options = options or ExportOptions()
    target = Path(dirpath)
    check_target(target, options.overwrite)
    _, root, hf = export_root(module)
    source = original or optional_source(module, root, source_path, options.merge_base)
    to_save = modules_to_save_names([name for name, _ in root.named_modules() if name], modules_to_save)
    name = source_dir(module, root, source_path)
    result = ExportResult(target)
    with memory_meter(options.measure_memory) as meter, atomic_directory(target, options.overwrite) as tmp:
        if lora_layers(root) and (why := no_peft_layout(root) or no_parameter_layout(root)):
            print(f"export: no PEFT adapter written ({why}); merged/ holds the adapted weights.")
        elif lora_layers(root):
            write_adapter(root, tmp / "adapter", to_save, base_model_name(module, str(name) if name else None))
            to_peft_parameters(root, tmp / "adapter", PEFT_PREFIX)
            result.adapter = target / "adapter"
        result.dropped_tied = write_merged(
            root, tmp / "merged", options, source, hf, tokenizer if hf else None, target=target,
            files_from=Path(name) if name and Path(name).is_dir() else None,
        )  # fmt: skip
        result.merged = target / "merged"
        if options.format == "gguf":  # llama.cpp's files from the merged ones, which they replace
            result.gguf, result.merged = [target / name for name in merged_to_gguf(tmp, options.gguf_type)], None
    result.memory = meter.result() if meter is not None else None
    if source is not None:
        result.report = merge_report(root, source, probe)
    return result


def make_probe(module: nn.Module, batch: Any) -> Callable[[], torch.Tensor] | None:
    """A forward on (up to two rows of) ``batch``: the HF model on ``input_ids``/``attention_mask`` (and the
    ``position_ids`` of packed rows, which keep each example's attention to itself), or the module on its
    ``example_input_array``; ``None`` when neither applies."""
    _, root, hf = export_root(module)
    if hf and isinstance(batch, dict) and isinstance(batch.get("input_ids"), torch.Tensor):
        keys = ("input_ids", "attention_mask", "position_ids")
        inputs = {k: batch[k][:2].detach().clone() for k in keys if isinstance(batch.get(k), torch.Tensor)}
        return lambda: root(**inputs, use_cache=False).logits  # type: ignore[no-any-return]  # (a cache drops positions)
    example = getattr(module, "example_input_array", None)
    if isinstance(example, torch.Tensor):
        return lambda: module(example)  # type: ignore[no-any-return]
    return None
