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

Example:
    >>> result = export_model(pl_module, "out/export", ExportOptions(dtype="bf16"))  # doctest: +SKIP
    >>> print(result.report.format())  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lightning_adapt.lora import LoRALinear, base_weight, lora_modules
from lightning_adapt.quant import is_quantized

MergeBase = Literal["original", "dequantized"]
DTypeName = Literal["fp32", "bf16", "fp16"]
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PEFT_PREFIX = "base_model.model."
_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
_TASK_TYPES = {
    "ForCausalLM": "CAUSAL_LM",
    "ForSequenceClassification": "SEQ_CLS",
    "ForTokenClassification": "TOKEN_CLS",
    "ForQuestionAnswering": "QUESTION_ANS",
}


class ExportError(ValueError):
    """An export that cannot be done as asked; raised before anything is written."""


def parse_size(size: int | str) -> int:
    """Bytes of ``5GB`` / ``200MB`` / ``1GiB`` / ``1000`` (decimal units as Hugging Face; ``iB`` binary)."""
    if isinstance(size, int) and not isinstance(size, bool):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", str(size).upper())
    if match is None:
        raise ExportError(f"max_shard_size={size!r}: expected bytes or e.g. '5GB', '500MB', '1GiB'.")
    return int(float(match.group(1)) * _UNITS[match.group(2) or "B"])


@dataclass(frozen=True)
class ExportOptions:
    """How to export.

    Args:
        merge_base: ``original``: merge quantized layers into the full-precision weights re-read from the
            source checkpoint; ``dequantized``: into the dequantized (e.g. NF4) weights held in memory.
        dtype: dtype of the merged floating tensors; ``None`` keeps each base tensor's own dtype.
        max_shard_size: above this size the merged weights are sharded (``model-0000k-of-0000n``).
        overwrite: replace an existing non-empty ``dirpath`` (atomically) instead of refusing.
    """

    merge_base: MergeBase = "original"
    dtype: DTypeName | None = None
    max_shard_size: int | str = "5GB"
    overwrite: bool = False

    def __post_init__(self) -> None:
        problems = []
        if self.merge_base not in get_args(MergeBase):
            problems.append(f"merge_base={self.merge_base!r}: allowed {get_args(MergeBase)}.")
        if self.dtype is not None and self.dtype not in DTYPES:
            problems.append(f"dtype={self.dtype!r}: allowed {list(DTYPES)} or None (keep the base dtype).")
        try:
            if parse_size(self.max_shard_size) < 1:
                problems.append(f"max_shard_size={self.max_shard_size!r}: must be > 0, e.g. '5GB'.")
        except ExportError as err:
            problems.append(str(err))
        if problems:
            raise ExportError("Invalid export options:\n  - " + "\n  - ".join(problems))


# --------------------------------------------------------------------------- finding the model


def find_hf_model(module: nn.Module) -> tuple[str, nn.Module] | None:
    """``(dotted name, model)`` of the outermost ``transformers.PreTrainedModel`` in ``module``, if any."""
    transformers = sys.modules.get("transformers")  # never imported: no module can be one
    if transformers is None:
        return None
    pretrained = transformers.PreTrainedModel
    return next(((n, m) for n, m in module.named_modules() if isinstance(m, pretrained)), None)


def export_root(module: nn.Module) -> tuple[str, nn.Module, bool]:
    """``(prefix, root, is_hf)``: the HF model inside ``module`` (keys relative to it), else ``module``."""
    found = find_hf_model(module)
    if found is None:
        return "", module, False
    name, model = found
    return (name + "." if name else ""), model, True


def _is_conv1d(layer: nn.Module) -> bool:
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    return pytorch_utils is not None and isinstance(layer, pytorch_utils.Conv1D)


# --------------------------------------------------------------------------- original weights


class SourceWeights:
    """Reads single tensors from a safetensors checkpoint directory (``model.safetensors`` or an index).

    Keys are tried as given, then with the ``base_model_prefix`` added or removed, so a task model
    (``bert.encoder...``) reads a bare base checkpoint (``encoder...``) and the other way round.
    """

    def __init__(self, path: str | Path, base_model_prefix: str = "", argument: str = "source_path") -> None:
        self.path = Path(path)
        self.prefix = base_model_prefix
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            self.files = {k: self.path / f for k, f in weight_map.items()}
        elif single.is_file():
            with safe_open(single, framework="pt") as f:
                self.files = dict.fromkeys(f.keys(), single)
        else:
            raise ExportError(
                f"{argument}={str(path)!r}: no model.safetensors (or index) to re-read the original weights from "
                "(pickled .bin checkpoints are not read). Fix: point it at the safetensors directory the model "
                "was loaded from, or use merge_base='dequantized' to merge into the dequantized weights."
            )

    def resolve(self, key: str) -> str | None:
        """The checkpoint key holding the model's ``key``, or ``None``."""
        p = self.prefix + "." if self.prefix else ""
        alternatives = [key, key[len(p) :] if p and key.startswith(p) else p + key]
        return next((k for k in alternatives if k in self.files), None)

    def shape(self, key: str) -> tuple[int, ...] | None:
        found = self.resolve(key)
        if found is None:
            return None
        with safe_open(self.files[found], framework="pt") as f:
            return tuple(f.get_slice(found).get_shape())

    def get(self, key: str) -> torch.Tensor:
        found = self.resolve(key)
        if found is None:
            raise ExportError(f"source {self.path}: no tensor for {key!r}.")
        with safe_open(self.files[found], framework="pt") as f:
            tensor: torch.Tensor = f.get_tensor(found)
        return tensor


def source_for(module: nn.Module, root: nn.Module, source_path: str | Path | None, argument: str) -> SourceWeights:
    """The original weights for every quantized layer of ``root``, checked (names, shapes) up front."""
    path = source_path or getattr(module, "source_path", None) or getattr(root, "name_or_path", None)
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


def _quantized_bases(root: nn.Module) -> list[tuple[str, Any]]:
    """``(name, quantized layer)`` under the name its weight has in the un-adapted model."""
    out = []
    for name, module in root.named_modules():
        if is_quantized(module):
            out.append((name.removesuffix(".base_layer"), module))
    return out


# --------------------------------------------------------------------------- merged tensors


@torch.no_grad()
def merged_weight_on(layer: LoRALinear, weight: torch.Tensor) -> torch.Tensor:
    """The adapted ``(out, in)`` fp32 weight of ``layer`` with ``weight`` as its base (DoRA-aware)."""
    weight = weight.float()
    delta = layer.delta_weight().to(weight.device)
    magnitude = layer.lora_magnitude_vector
    if magnitude is None:
        return weight + delta
    norm = torch.linalg.vector_norm(weight + delta, dim=1)
    merged: torch.Tensor = (magnitude.float().to(weight.device) / norm).view(-1, 1) * (weight + delta)
    return merged


def _natural_dtype(layer: nn.Module) -> torch.dtype:
    dtype = getattr(layer, "original_dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    weight = getattr(layer, "weight", None)
    return weight.dtype if isinstance(weight, torch.Tensor) and weight.is_floating_point() else torch.float32


@dataclass(frozen=True)
class _Entry:
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class _Merger:
    """Lists the merged model's tensors (under original key names) without computing them."""

    def __init__(self, root: nn.Module, source: SourceWeights | None, tied: Literal["drop", "copy"]) -> None:
        self.root, self.source, self.tied = root, source, tied
        self.seen: dict[int, str] = {}
        self.dropped: list[str] = []
        self.entries: list[_Entry] = []

    def base(self, key: str, layer: nn.Module) -> torch.Tensor:
        if self.source is not None and is_quantized(layer):
            return self.source.get(key).float()
        return base_weight(layer).cpu()

    def weight_entry(self, prefix: str, layer: nn.Module) -> None:
        base = layer.base_layer if isinstance(layer, LoRALinear) else layer
        key = prefix + "weight"

        def load() -> torch.Tensor:
            weight = self.base(key, base)
            if isinstance(layer, LoRALinear) and not layer.merged:
                weight = merged_weight_on(layer, weight)
            return weight.T if _is_conv1d(base) else weight

        dims = (int(getattr(layer, "out_features", 0)), int(getattr(layer, "in_features", 0)))
        self.entries.append(_Entry(key, dims[::-1] if _is_conv1d(base) else dims, _natural_dtype(base), load))
        bias = getattr(base, "bias", None)
        if isinstance(bias, torch.Tensor):
            self.tensor_entry(prefix + "bias", bias)

    def tensor_entry(self, key: str, tensor: torch.Tensor) -> None:
        if id(tensor) in self.seen and self.tied == "drop":
            self.dropped.append(key)  # safetensors refuses shared tensors; from_pretrained re-ties
            return
        shared = id(tensor) in self.seen
        self.seen.setdefault(id(tensor), key)
        self.entries.append(
            _Entry(
                key,
                tuple(tensor.shape),
                tensor.dtype,
                lambda: tensor.detach().cpu().clone() if shared else tensor.detach().cpu(),
            )
        )

    def walk(self, module: nn.Module, prefix: str = "") -> list[_Entry]:
        if isinstance(module, LoRALinear) or is_quantized(module):
            self.weight_entry(prefix, module)
            return self.entries
        for name, param in module._parameters.items():
            if param is not None:
                self.tensor_entry(prefix + name, param)
        for name, buf in module._buffers.items():
            if buf is not None and name not in module._non_persistent_buffers_set:
                self.tensor_entry(prefix + name, buf)
        for name, child in module._modules.items():
            if child is not None:
                self.walk(child, f"{prefix}{name}.")
        return self.entries


def _check_tied_adapters(root: nn.Module) -> None:
    """An adapted layer whose base weight is shared (tied lm_head) cannot be merged under a tied config."""
    ids: dict[int, int] = {}
    for _, param in root.named_parameters(remove_duplicate=False):
        ids[id(param)] = ids.get(id(param), 0) + 1
    tied = [n for n, layer in lora_modules(root) if ids.get(id(getattr(layer.base_layer, "weight", None)), 0) > 1]
    if tied:
        raise ExportError(
            f"target_modules adapts {tied}, whose weight is tied to another module: the merged weight would be "
            "re-tied (and lost) on load. Fix: exclude it from target_modules (add it to exclude_modules)."
        )


def _out_dtype(entry: _Entry, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and entry.dtype.is_floating_point else entry.dtype


def _stream_safetensors(path: Path, entries: list[_Entry], dtype: torch.dtype | None) -> int:
    """Write a safetensors file tensor by tensor: the header (shapes and offsets) is known up front, so
    each tensor is computed, written and released before the next; returns the data size in bytes."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for entry in entries:
        out_dtype = _out_dtype(entry, dtype)
        nbytes = entry.numel * torch.empty((), dtype=out_dtype).element_size()
        header[entry.key] = {
            "dtype": _ST_DTYPES[out_dtype],
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for entry in entries:
            tensor = entry.load().to(_out_dtype(entry, dtype)).contiguous()
            if tuple(tensor.shape) != entry.shape:
                raise ExportError(f"{entry.key}: computed shape {tuple(tensor.shape)}, expected {entry.shape}.")
            f.write(tensor.reshape(-1).view(torch.uint8).numpy().data)  # a buffer view: no extra copy
    return offset


def write_safetensors(out: Path, entries: list[_Entry], dtype: torch.dtype | None, max_shard: int) -> list[str]:
    """Write ``entries`` into shards of at most ``max_shard`` bytes (``model.safetensors`` when one, else
    ``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``); returns the file names."""
    shards: list[list[_Entry]] = [[]]
    size = 0
    for entry in entries:
        nbytes = entry.numel * torch.empty((), dtype=_out_dtype(entry, dtype)).element_size()
        if shards[-1] and size + nbytes > max_shard:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map: dict[str, str] = {}
    total = 0
    for name, shard in zip(names, shards, strict=True):
        total += _stream_safetensors(out / name, shard, dtype)
        weight_map.update(dict.fromkeys((e.key for e in shard), name))
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names


def _write_hf_files(root: nn.Module, out: Path, dtype: torch.dtype | None, tokenizer: Any) -> None:
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
    """Write the merged model of ``root`` into ``out``; returns the tied keys that were dropped."""
    _check_tied_adapters(root)
    merger = _Merger(root, source if options.merge_base == "original" else None, "drop" if hf else "copy")
    entries = merger.walk(root)
    out.mkdir(parents=True)
    dtype = DTYPES[options.dtype] if options.dtype else None
    write_safetensors(out, entries, dtype, parse_size(options.max_shard_size))
    if hf:
        _write_hf_files(root, out, dtype, tokenizer)
    return merger.dropped


# --------------------------------------------------------------------------- PEFT-format adapter


def _peft_targets(root: nn.Module, names: list[str]) -> list[str]:
    """Leaf names when they select exactly the adapted layers (PEFT's suffix rule), else full names."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    selected = {n for n, _ in root.named_modules() if n.rsplit(".", 1)[-1] in leaves}
    return leaves if selected == set(names) else sorted(names)


def adapter_config(root: nn.Module, modules_to_save: list[str], base_model_name_or_path: str | None) -> dict[str, Any]:
    """PEFT ``LoraConfig`` fields describing the adapters in ``root`` (one r/alpha for all layers)."""
    layers = lora_modules(root)
    settings = {(m.r, m.alpha, m.use_rslora, m.use_dora, getattr(m.lora_dropout, "p", 0.0)) for _, m in layers}
    if len(settings) != 1:
        raise ExportError(f"the adapted layers use different (r, alpha, rslora, dora, dropout): {sorted(settings)}.")
    r, alpha, rslora, dora, dropout = settings.pop()
    task = next((t for suffix, t in _TASK_TYPES.items() if type(root).__name__.endswith(suffix)), None)
    return {
        "peft_type": "LORA",
        "task_type": task,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": dropout,
        "target_modules": _peft_targets(root, [n for n, _ in layers]),
        "modules_to_save": modules_to_save or None,
        "use_rslora": rslora,
        "use_dora": dora,
        "fan_in_fan_out": any(_is_conv1d(m.base_layer) for _, m in layers),
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
    }


def adapter_state(root: nn.Module, modules_to_save: list[str]) -> dict[str, torch.Tensor]:
    """PEFT keys: ``base_model.model.<layer>.lora_A.weight`` / ``lora_B.weight`` / ``lora_magnitude_vector``
    and ``base_model.model.<module>.<param>`` for ``modules_to_save``."""
    state: dict[str, torch.Tensor] = {}
    for name, layer in lora_modules(root):
        for key, param in (("lora_A.weight", layer.lora_A.weight), ("lora_B.weight", layer.lora_B.weight)):
            state[f"{PEFT_PREFIX}{name}.{key}"] = param.detach().cpu().contiguous()
        if layer.lora_magnitude_vector is not None:
            state[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector.detach().cpu()
    for name in modules_to_save:
        for key, value in root.get_submodule(name).state_dict().items():
            state[f"{PEFT_PREFIX}{name}.{key}"] = value.detach().cpu().clone()
    return state


def write_adapter(root: nn.Module, out: Path, modules_to_save: list[str], base_model_name_or_path: str | None) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT's format) into ``out``."""
    out.mkdir(parents=True)
    config = adapter_config(root, modules_to_save, base_model_name_or_path)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(adapter_state(root, modules_to_save), str(out / "adapter_model.safetensors"), metadata={"format": "pt"})


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


def _merged_pair(root: nn.Module, source: SourceWeights) -> Iterator[tuple[str, nn.Module, torch.Tensor, torch.Tensor]]:
    """``(name, module, original merge, dequantized merge)`` per quantized layer, one at a time."""
    for name, module in root.named_modules():
        if isinstance(module, LoRALinear) and is_quantized(module.base_layer):
            yield name, module, merged_weight_on(module, source.get(name + ".weight")), module.merged_weight().cpu()
        elif is_quantized(module) and not name.endswith(".base_layer"):
            yield name, module, source.get(name + ".weight").float(), base_weight(module).cpu()


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


@torch.no_grad()
def merge_report(
    root: nn.Module, source: SourceWeights, probe: Callable[[], torch.Tensor] | None = None
) -> MergeReport:
    """Max ``|W'_original - W'_dequantized|`` over quantized layers and, with ``probe`` (a forward on a
    fixed batch), the max output difference. The probe holds both dense copies of the quantized layers
    for a moment: pass it only when that memory is available."""
    worst, worst_name, count = 0.0, "", 0
    originals: dict[str, torch.Tensor] = {}
    dequantized: dict[str, torch.Tensor] = {}
    for name, _, original, dequant in _merged_pair(root, source):
        count += 1
        diff = float((original - dequant).abs().max())
        worst, worst_name = (diff, name) if diff >= worst else (worst, worst_name)
        if probe is not None:
            originals[name], dequantized[name] = original, dequant
    output = None
    if probe is not None and count:
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
        output = float((y_original - y_dequant).abs().max())
    return MergeReport(count, worst, worst_name, output)


# --------------------------------------------------------------------------- atomic directories and the entry point


def check_target(target: Path, overwrite: bool, argument: str) -> None:
    """Refuse a target that is a file, or a non-empty directory unless ``overwrite``."""
    if target.exists() and not target.is_dir():
        raise ExportError(f"{argument}={str(target)!r} is a file. Fix: choose a directory path.")
    entries = sorted(p.name for p in target.iterdir()) if target.is_dir() else []
    if entries and not overwrite:
        raise ExportError(
            f"{argument}={str(target)!r} exists and is not empty ({entries[:5]}). Fix: choose a new or empty "
            "directory, or allow replacing it (overwrite=True)."
        )


@contextmanager
def atomic_directory(target: Path, overwrite: bool = False, argument: str = "dirpath") -> Iterator[Path]:
    """Yield a temp dir next to ``target``; on success it replaces ``target`` (``os.replace``), on any
    error (or interrupt) it is removed, so ``target`` is either untouched or complete."""
    check_target(target, overwrite, argument)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        os.chmod(tmp, 0o755)
        yield tmp
        old = None
        if target.is_dir() and any(target.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@dataclass
class ExportResult:
    """What :func:`export_model` wrote."""

    dirpath: Path
    adapter: Path | None = None
    merged: Path | None = None
    dropped_tied: list[str] = field(default_factory=list)
    report: MergeReport | None = None


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
    quantized = bool(_quantized_bases(root))
    source = None
    if quantized and options.merge_base == "original":
        source = source_for(module, root, source_path, "source_path")
    elif quantized:  # dequantized merge: the original weights only feed the report, when they are there
        try:
            source = source_for(module, root, source_path, "source_path")
        except ExportError:
            source = None
    from lightning_adapt.inject import select_modules

    to_save = select_modules(root, list(modules_to_save), "modules_to_save") if modules_to_save else []
    name = str(source_path or getattr(module, "source_path", None) or getattr(root, "name_or_path", "") or "") or None
    result = ExportResult(target)
    with atomic_directory(target, options.overwrite, argument) as tmp:
        if lora_modules(root):
            write_adapter(root, tmp / "adapter", to_save, name)
            result.adapter = target / "adapter"
        result.dropped_tied = write_merged(root, tmp / "merged", options, source, hf, tokenizer if hf else None)
        result.merged = target / "merged"
    if source is not None:
        result.report = merge_report(root, source, probe)
    return result
