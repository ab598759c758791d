"""Export an adapted model as a PEFT-format adapter and as a merged model. Pure torch + safetensors.

:func:`export_model` writes, atomically (a temp dir next to ``dirpath``, then ``os.replace``)::

    <dirpath>/adapter/adapter_config.json, adapter_model.safetensors   peft.PeftModel.from_pretrained(base, ...)
    <dirpath>/merged/config.json, model.safetensors (+ shards, index)  AutoModel*.from_pretrained(...)

Each adapted layer is written under its original key as ``W' = W + scale·B@A`` (DoRA:
``m·(W+ΔW)/‖W+ΔW‖_row``), computed in fp32 and cast to the output dtype last; ``modules_to_save`` are
written as trained. For a module that holds no Hugging Face model, ``merged/`` is a safetensors state dict
with the module's original key names that loads ``strict=True`` into the un-adapted module.

QLoRA: by default the merge uses the original full-precision weights re-read (tensor by tensor, with
``safe_open``) from the checkpoint the model was loaded from, not the dequantized NF4 copy; the merged
model is never re-quantized. :class:`MergeReport` says how far the two choices differ.

Memory: tensors are computed and written shard by shard, so the peak is the model plus one shard.

The parts live in :mod:`lightning_adapt.export.peft_format` (adapter layout, HF model lookup),
:mod:`lightning_adapt.export.merged_state` (the merged tensors, computed lazily) and
:mod:`lightning_adapt.export.safetensors_io` (streaming sharded writer, source reader, atomic directories);
this module chooses the source of the original weights, orchestrates the writes and reports.

Example:
    >>> result = export_model(pl_module, "out/export", ExportOptions(dtype="bf16"))  # doctest: +SKIP
    >>> print(result.report.format())  # doctest: +SKIP
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import nn

from lightning_adapt.adapters.lora import LoRALinear, lora_modules
from lightning_adapt.errors import ExportError
from lightning_adapt.export.merged_state import check_tied_adapters, merged_entries
from lightning_adapt.export.peft_format import PEFT_PREFIX, export_root, write_adapter
from lightning_adapt.export.safetensors_io import (
    SourceWeights,
    atomic_directory,
    check_target,
    parse_size,
    write_safetensors,
)
from lightning_adapt.layers import DTYPES, base_weight, quantized_layers
from lightning_adapt.naming import select

__all__ = [
    "DTYPES",
    "PEFT_PREFIX",
    "DTypeName",
    "ExportError",
    "ExportOptions",
    "ExportResult",
    "MergeBase",
    "MergeReport",
    "check_target",
    "export_model",
    "export_root",
    "find_tokenizer",
    "make_probe",
    "merge_report",
    "source_for",
    "write_merged",
]

MergeBase = Literal["original", "dequantized"]
DTypeName = Literal["fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class ExportOptions:
    """How to export.

    Args:
        merge_base: ``original``: merge quantized layers into the full-precision weights re-read from the
            source checkpoint; ``dequantized``: into the dequantized (e.g. NF4) weights held in memory.
        dtype: dtype of the merged floating tensors; ``None`` keeps each base tensor's own dtype.
        max_shard_size: above this size the merged weights are sharded (``model-0000k-of-0000n``).
        overwrite: replace an existing non-empty ``dirpath`` (atomically) instead of refusing.

    Raises:
        ExportError: every invalid option, listed at once.
    """

    merge_base: MergeBase = "original"
    dtype: DTypeName | None = None
    max_shard_size: int | str = "5GB"
    overwrite: bool = False

    def __post_init__(self) -> None:
        problems = []
        if self.merge_base not in get_args(MergeBase):
            problems.append(f"merge_base={self.merge_base!r}: allowed {get_args(MergeBase)}.")
        if self.dtype is not None and self.dtype not in get_args(DTypeName):
            problems.append(f"dtype={self.dtype!r}: allowed {list(get_args(DTypeName))} or None (keep the base dtype).")
        try:
            if parse_size(self.max_shard_size) < 1:
                problems.append(f"max_shard_size={self.max_shard_size!r}: must be > 0, e.g. '5GB'.")
        except ExportError as err:
            problems.append(str(err))
        if problems:
            raise ExportError("Invalid export options:\n  - " + "\n  - ".join(problems))


# --------------------------------------------------------------------------- original weights


def _source_dir(module: nn.Module, root: nn.Module, source_path: str | Path | None) -> str | Path | None:
    """``source_path``, else ``module.source_path``, else the HF model's ``name_or_path``; ``None`` if none."""
    return source_path or getattr(module, "source_path", None) or getattr(root, "name_or_path", None) or None


def _quantized_bases(root: nn.Module) -> list[tuple[str, Any]]:
    """``(name, quantized layer)`` under the name its weight has in the un-adapted model."""
    return [(name.removesuffix(".base_layer"), layer) for name, layer in quantized_layers(root)]


def source_for(module: nn.Module, root: nn.Module, source_path: str | Path | None, argument: str) -> SourceWeights:
    """The original weights for every quantized layer of ``root``, checked (names, shapes) up front.

    Raises:
        ExportError: no such directory, no safetensors in it, or a quantized layer it does not match.
    """
    path = _source_dir(module, root, source_path)
    if not path or not Path(path).is_dir():
        raise ExportError(
            f"{argument}={str(path) if path else None!r}: merge_base='original' needs the directory the model was "
            "loaded from, to re-read the full-precision weights of the quantized layers. Fix: set "
            f"{argument} to that safetensors directory, or use merge_base='dequantized'."
        )
    source = SourceWeights(path, str(getattr(root, "base_model_prefix", "") or ""), argument)
    bad = []
    for name, layer in _quantized_bases(root):
        want = (int(layer.out_features), int(layer.in_features))
        got = source.shape(name + ".weight")
        if got != want:
            bad.append(f"{name}.weight: source {got} vs model {want}")
    if bad:
        raise ExportError(
            f"{argument}={str(path)!r} does not hold this model's weights ({'; '.join(bad[:3])}). Fix: point it at "
            "the checkpoint the model was loaded from, or use merge_base='dequantized'."
        )
    return source


def _optional_source(
    module: nn.Module, root: nn.Module, source_path: str | Path | None, merge_base: MergeBase
) -> SourceWeights | None:
    """The source for a model with quantized layers: required for ``original``; for ``dequantized`` it
    only feeds the report, so it is ``None`` when it is not there."""
    if not quantized_layers(root):
        return None
    try:
        return source_for(module, root, source_path, "source_path")
    except ExportError:
        if merge_base == "original":
            raise
        return None


# --------------------------------------------------------------------------- the merged model


def _write_hf_files(root: nn.Module, out: Path, dtype: torch.dtype | None, tokenizer: Any) -> None:
    """``config.json`` (no quantization_config), the generation config and the tokenizer, next to the weights."""
    model: Any = root
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the merged weights are plain floats: never re-quantized on load
    config.architectures = [type(root).__name__]
    config.dtype = dtype or next((p.dtype for p in root.parameters() if p.is_floating_point()), torch.float32)
    config.save_pretrained(out)
    generation = getattr(root, "generation_config", None)
    can_generate = getattr(root, "can_generate", None)
    if generation is not None and callable(can_generate) and can_generate():
        generation.save_pretrained(out)
    if tokenizer is not None and callable(getattr(tokenizer, "save_pretrained", None)):
        tokenizer.save_pretrained(out)


def write_merged(
    root: nn.Module, out: Path, options: ExportOptions, source: SourceWeights | None, hf: bool, tokenizer: Any = None
) -> list[str]:
    """Create ``out`` and write the merged model of ``root`` into it; returns the tied keys that were dropped."""
    check_tied_adapters(root)
    entries, dropped = merged_entries(
        root, source if options.merge_base == "original" else None, "drop" if hf else "copy"
    )
    out.mkdir(parents=True)
    dtype = DTYPES[options.dtype] if options.dtype else None
    write_safetensors(out, entries, dtype, parse_size(options.max_shard_size))
    if hf:
        _write_hf_files(root, out, dtype, tokenizer)
    return dropped


# --------------------------------------------------------------------------- original vs dequantized report


@dataclass(frozen=True)
class MergeReport:
    """How far merging into the original weights is from merging into the dequantized ones."""

    layers: int
    max_abs_dw: float
    worst_layer: str
    output_max_abs_diff: float | None = None

    def format(self) -> str:
        out = "" if self.output_max_abs_diff is None else f"; probe output max |Δy| = {self.output_max_abs_diff:.3e}"
        return (
            f"merge base original vs dequantized over {self.layers} quantized layers: max |ΔW| = "
            f"{self.max_abs_dw:.3e} (worst {self.worst_layer}){out}"
        )


def _merged_pair(root: nn.Module, source: SourceWeights) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(name, original merge, dequantized merge)`` per quantized layer, one at a time."""
    for name, layer in _quantized_bases(root):
        original = source.get(name + ".weight")
        wrapper = root.get_submodule(name)
        if isinstance(wrapper, LoRALinear):
            yield name, wrapper.merged_weight(original), wrapper.merged_weight().cpu()
        else:
            yield name, original.float(), base_weight(layer).cpu()


@contextmanager
def _dense_layers(root: nn.Module, weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily replace the named layers by ``nn.Linear`` holding the given weights."""
    saved: dict[str, nn.Module] = {}
    try:
        for name, weight in weights.items():
            layer = root.get_submodule(name)
            base = layer.base_layer if isinstance(layer, LoRALinear) else layer
            bias, dtype = getattr(base, "bias", None), getattr(base, "compute_dtype", None) or torch.float32
            device = next(layer.parameters()).device
            dense = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=device, dtype=dtype)
            dense.weight.data.copy_(weight)
            if bias is not None:
                dense.bias.data.copy_(bias)
            saved[name] = layer
            root.set_submodule(name, dense)
        yield
    finally:
        for name, layer in saved.items():
            root.set_submodule(name, layer)


def _probe_difference(
    root: nn.Module,
    probe: Callable[[], torch.Tensor],
    originals: dict[str, torch.Tensor],
    dequantized: dict[str, torch.Tensor],
) -> float:
    """Max ``|probe()|`` difference with the quantized layers replaced by each set of dense weights (eval mode)."""
    modes = [m.training for m in root.modules()]
    root.eval()
    try:
        with _dense_layers(root, originals):
            y_original = probe().float()
        with _dense_layers(root, dequantized):
            y_dequant = probe().float()
    finally:
        for module, mode in zip(root.modules(), modes, strict=True):
            module.training = mode
    return float((y_original - y_dequant).abs().max())


@torch.no_grad()
def merge_report(
    root: nn.Module, source: SourceWeights, probe: Callable[[], torch.Tensor] | None = None
) -> MergeReport:
    """Max ``|W'_original - W'_dequantized|`` over quantized layers and, with ``probe`` (a forward on a
    fixed batch), the max output difference. The probe holds both dense copies of the quantized layers
    for a moment: pass it only when that memory is available. ``root`` is restored (modules and modes)."""
    worst, worst_name, count = 0.0, "", 0
    originals: dict[str, torch.Tensor] = {}
    dequantized: dict[str, torch.Tensor] = {}
    for name, original, dequant in _merged_pair(root, source):
        count += 1
        diff = float((original - dequant).abs().max())
        worst, worst_name = (diff, name) if diff >= worst else (worst, worst_name)
        if probe is not None:
            originals[name], dequantized[name] = original, dequant
    output = _probe_difference(root, probe, originals, dequantized) if probe is not None and count else None
    return MergeReport(count, worst, worst_name, output)


# --------------------------------------------------------------------------- the entry point


@dataclass
class ExportResult:
    """What :func:`export_model` wrote."""

    dirpath: Path
    adapter: Path | None = None
    merged: Path | None = None
    dropped_tied: list[str] = field(default_factory=list)
    report: MergeReport | None = None


def find_tokenizer(*owners: Any) -> Any:
    """The first ``tokenizer`` attribute of ``owners`` that can be saved (``save_pretrained``), else ``None``."""
    for owner in owners:
        tokenizer = getattr(owner, "tokenizer", None)
        if callable(getattr(tokenizer, "save_pretrained", None)):
            return tokenizer
    return None


def make_probe(module: nn.Module, batch: Any) -> Callable[[], torch.Tensor] | None:
    """A forward on (up to two rows of) ``batch``: the HF model on ``input_ids``/``attention_mask``, or
    the module on its ``example_input_array``; ``None`` when neither applies."""
    _, root, hf = export_root(module)
    if hf and isinstance(batch, dict) and isinstance(batch.get("input_ids"), torch.Tensor):
        inputs = {k: batch[k][:2].detach().clone() for k in ("input_ids", "attention_mask") if k in batch}
        return lambda: root(**inputs).logits  # type: ignore[no-any-return]
    example = getattr(module, "example_input_array", None)
    if isinstance(example, torch.Tensor):
        return lambda: module(example)  # type: ignore[no-any-return]
    return None


def export_model(
    module: nn.Module,
    dirpath: str | Path,
    options: ExportOptions | None = None,
    *,
    modules_to_save: Sequence[str] = (),
    source_path: str | Path | None = None,
    tokenizer: Any = None,
    probe: Callable[[], torch.Tensor] | None = None,
    argument: str = "dirpath",
) -> ExportResult:
    """Write ``<dirpath>/adapter`` (if ``module`` holds LoRA layers) and ``<dirpath>/merged``, atomically.

    Args:
        module: the adapted module (a LightningModule or any ``nn.Module``); it is not modified.
        dirpath: target directory; must be absent or empty unless ``options.overwrite``.
        options: merge base, dtype, shard size, overwrite.
        modules_to_save: fully trained modules (LoRASpec entries) saved with the adapter.
        source_path: checkpoint directory of the original weights (default: ``module.source_path``, then the
            HF model's ``name_or_path``); needed for ``merge_base='original'`` with quantized layers.
        tokenizer: saved next to a merged Hugging Face model.
        probe: a forward on a fixed batch, for the output difference in the merge report.
        argument: the name of ``dirpath`` in error messages (``--output`` in the CLI).

    Raises:
        ExportError: before anything is written, for a non-empty target or a missing/mismatched source.
    """
    options = options or ExportOptions()
    target = Path(dirpath)
    check_target(target, options.overwrite, argument)
    _, root, hf = export_root(module)
    source = _optional_source(module, root, source_path, options.merge_base)
    names = [name for name, _ in root.named_modules() if name]
    to_save = select(names, list(modules_to_save), "modules_to_save") if modules_to_save else []
    name = _source_dir(module, root, source_path)
    result = ExportResult(target)
    with atomic_directory(target, options.overwrite, argument) as tmp:
        if lora_modules(root):
            write_adapter(root, tmp / "adapter", to_save, str(name) if name else None)
            result.adapter = target / "adapter"
        result.dropped_tied = write_merged(root, tmp / "merged", options, source, hf, tokenizer if hf else None)
        result.merged = target / "merged"
    if source is not None:
        result.report = merge_report(root, source, probe)
    return result
