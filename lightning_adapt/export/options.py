"""How to export (:class:`ExportOptions`): the settings both the in-memory and the streamed export take."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from lightning_adapt.errors import ExportError
from lightning_adapt.export.safetensors_io import parse_size

__all__ = ["DTypeName", "ExportFormat", "ExportOptions", "GGUFType", "MergeBase"]

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
