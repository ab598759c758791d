"""Build a model with empty weights, then stream a safetensors checkpoint into it, quantizing on the way.

Peak memory ≈ the final model + one checkpoint tensor (+ the temporaries of quantizing it), instead of
the whole model in fp32 first::

    with empty_weights():  # parameters on meta, buffers (RoPE inv_freq) real
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    report = load_pretrained(model, WeightSource("ckpt/"), plan=QuantPlan(QuantConfig("nf4")), dtype=torch.bfloat16)

The Linear layers the plan selects (the rules of :func:`~lightning_adapt.quantize.quantize_model`) stay
empty until their weight arrives; it is then cast to fp32 and quantized by
:func:`~lightning_adapt.quantize.quantize_linear`, bit-identical to loading in fp32 and calling
``quantize_model``. Every other tensor goes straight to ``dtype``. Tensors are read with plain file reads,
one at a time: a memory-mapped shard counts every touched page as resident until it is closed. Headers are
checked before any data is read, and every problem is reported in one :class:`~lightning_adapt.errors.LoadError`.
Pure torch: no Lightning here.
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import struct
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from lightning_adapt.errors import ConfigError, LoadError
from lightning_adapt.layers import quant_storage_bytes, quantized_layers
from lightning_adapt.naming import check_entries, under
from lightning_adapt.quantize import QuantConfig, QuantPlan, default_compute_dtype, quantize_linear

__all__ = [
    "LoadReport",
    "QuantPlan",
    "WeightSource",
    "attach_quant_plan",
    "current_rss_bytes",
    "empty_weights",
    "load_pretrained",
    "peak_rss_bytes",
    "quant_plan",
]

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
#: Stale keys of buffers that models now compute in ``__init__`` (Hugging Face ignores them too).
_IGNORABLE = (r"rotary_emb\.inv_freq$", r"(^|\.)position_ids$")
_SINGLE, _INDEX = "model.safetensors", "model.safetensors.index.json"
_PLAN_KEY = "_lightning_adapt_quant_plan"


@contextmanager
def empty_weights() -> Iterator[None]:
    """Build modules with their parameters on the meta device and their buffers real.

    Parameters cost nothing until :func:`load_pretrained` fills them; buffers computed in ``__init__`` and
    absent from checkpoints (RoPE ``inv_freq``) keep their values. This is accelerate's
    ``init_empty_weights(include_buffers=False)`` without the dependency. The patch is process-wide while
    the block runs: build nothing in other threads meanwhile.
    """
    original = nn.Module.register_parameter

    def register_parameter(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = type(param)(param.to("meta"), requires_grad=param.requires_grad)
        original(self, name, param)

    # torch.device("meta") would put buffers on meta too, and inv_freq is not in any checkpoint.
    nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


@dataclass(frozen=True)
class WeightSource:
    """Where pretrained weights live, and which submodule of the loaded module they describe.

    Args:
        path: a directory holding ``model.safetensors`` or a sharded ``model.safetensors.index.json``, or
            one ``.safetensors`` file.
        prefix: dotted name of the submodule the file describes (``"model"`` for a LightningModule keeping
            its Hugging Face model in ``self.model``; ``""``: the whole module): file key ``k`` is the
            module's ``prefix.k``.

    Hugging Face's ``base_model_prefix`` (e.g. ``"bert"``) of that submodule is handled automatically: when
    the module's names carry it and the file's keys do not (BertForSequenceClassification from a BertModel
    checkpoint) it is stripped; when the file's keys carry it and the module's names do not (LlamaModel
    from a LlamaForCausalLM checkpoint) it is added, and the file's other keys (the head) are ignored.
    """

    path: str | Path
    prefix: str = ""


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_pretrained` did; sizes in bytes.

    ``peak_rss_increase_bytes`` is the growth of ``ru_maxrss``, a process-lifetime peak: 0 when the load
    stayed under an earlier peak. ``peak_rss_bytes - baseline_rss_bytes`` is the peak over the resident
    memory measured before the build (or before the load when no baseline was given).
    """

    files: tuple[str, ...]
    tensors_loaded: int
    quantized_layers: int
    initialized: tuple[str, ...]
    ignored_keys: tuple[str, ...]
    bytes_read: int
    weight_bytes: int
    largest_tensor_fp32_bytes: int
    seconds: float
    baseline_rss_bytes: int
    peak_rss_bytes: int
    peak_rss_increase_bytes: int

    def format(self) -> str:
        """One log line (MB = 10^6 bytes)."""
        return (
            f"loaded {self.tensors_loaded} tensors ({self.bytes_read / 1e6:.1f} MB read, {self.quantized_layers} "
            f"layers quantized) into {self.weight_bytes / 1e6:.1f} MB in {self.seconds:.1f}s; peak RSS "
            f"{(self.peak_rss_bytes - self.baseline_rss_bytes) / 1e6:.1f} MB over the baseline"
        )


def current_rss_bytes() -> int:
    """Resident set size now (``/proc/self/statm``); 0 where there is no ``/proc``."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (``ru_maxrss``; Linux reports KiB)."""
    peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return peak if sys.platform == "darwin" else peak * 1024


def attach_quant_plan(module: nn.Module, plan: QuantPlan | None) -> None:
    """Ask ``module`` to quantize while it loads (``None`` withdraws it): the seam for a callback that runs
    before ``configure_model``; a module loading through :func:`load_pretrained` reads :func:`quant_plan`."""
    if plan is None:
        module.__dict__.pop(_PLAN_KEY, None)
    else:
        module.__dict__[_PLAN_KEY] = plan


def quant_plan(module: nn.Module) -> QuantPlan | None:
    """The plan attached to ``module`` by :func:`attach_quant_plan`, or ``None``."""
    plan: QuantPlan | None = module.__dict__.get(_PLAN_KEY)
    return plan


# --------------------------------------------------------------------------- safetensors headers and reads


@dataclass(frozen=True)
class _Stored:
    """One tensor of a file; ``start`` is the absolute offset of its bytes."""

    file: Path
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    nbytes: int


def _few(names: Sequence[str], shown: int = 5) -> str:
    return ", ".join(map(repr, names[:shown])) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _entry(file: Path, key: str, meta: dict[str, list[int] | str], data_start: int, size: int) -> _Stored:
    dtype, shape = _ST_DTYPES[str(meta["dtype"])], tuple(int(d) for d in meta["shape"])
    begin, end = (int(o) for o in meta["data_offsets"])
    nbytes = math.prod(shape) * dtype.itemsize
    if end - begin != nbytes or begin < 0 or data_start + end > size:
        raise ValueError(f"tensor {key!r}: bytes [{begin}, {end}) do not hold {dtype} {list(shape)} in {size} bytes")
    return _Stored(file, key, dtype, shape, data_start + begin, nbytes)


def _read_header(file: Path, expected: Sequence[str]) -> dict[str, _Stored]:
    """The entries of ``file``; ``expected`` (the keys it should hold) is for the error message."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > size - 8:
                raise ValueError(f"header length {length} exceeds the file size {size}")
            header = json.loads(f.read(length))
        return {k: _entry(file, k, v, 8 + length, size) for k, v in header.items() if k != "__metadata__"}
    except (struct.error, ValueError, KeyError, TypeError, AttributeError) as err:
        raise LoadError(
            f"{file}: not a valid safetensors file ({err}); it should hold {_few(expected)}. "
            "Fix: download or save the checkpoint again."
        ) from err


def _index(path: Path, hint: Sequence[str]) -> dict[str, _Stored]:
    """Every tensor of the checkpoint at ``path`` by file key, from the headers alone."""
    files: dict[Path, list[str]] = {}
    if path.is_file() or (path / _SINGLE).is_file():
        files[path if path.is_file() else path / _SINGLE] = list(hint)
    elif (path / _INDEX).is_file():
        for key, name in json.loads((path / _INDEX).read_text())["weight_map"].items():
            files.setdefault(path / name, []).append(key)
    else:
        raise LoadError(
            f"WeightSource.path={str(path)!r}: no {_SINGLE}, {_INDEX} or .safetensors file there. "
            "Fix: point it at the checkpoint directory (pickled .bin checkpoints are not read)."
        )
    lost = [f"{f}: file not found; it should hold {_few(keys)}" for f, keys in files.items() if not f.is_file()]
    if lost:
        raise LoadError("\n".join(lost) + "\nFix: download the missing shards again.")
    return {k: v for file, keys in files.items() for k, v in _read_header(file, keys).items()}


def _read(stored: _Stored) -> torch.Tensor:
    """One tensor as stored, read into fresh CPU memory (the file is not mapped)."""
    buffer = torch.empty(stored.nbytes, dtype=torch.uint8, device="cpu")
    view, done = buffer.numpy().data, 0
    with open(stored.file, "rb", buffering=0) as f:
        f.seek(stored.start)
        while done < stored.nbytes:
            n = f.readinto(view[done:])
            if not n:
                raise LoadError(f"{stored.file}: tensor {stored.key!r} is cut short. Fix: download the file again.")
            done += n
    return buffer.view(stored.dtype).reshape(stored.shape)


# --------------------------------------------------------------------------- matching the model to the file


@dataclass
class _Slot:
    """One parameter or persistent buffer, registered under one or more names (tied weights)."""

    names: list[str]
    owners: list[tuple[nn.Module, str]]
    tensor: torch.Tensor
    is_param: bool
    stored: _Stored | None = None
    layer: str = ""  # the quantized layer it belongs to


def _slots(root: nn.Module, prefix: str) -> tuple[list[_Slot], list[str]]:
    """The loadable tensors of ``root`` and the names of its non-persistent buffers."""
    slots: dict[int, _Slot] = {}
    transient: list[str] = []
    for mod_name, mod in root.named_modules(remove_duplicate=False):
        dotted = ".".join(p for p in (prefix, mod_name) if p)
        dotted += "." if dotted else ""
        skip = mod._non_persistent_buffers_set
        named = [(n, t, True) for n, t in mod._parameters.items()]
        named += [(n, t, False) for n, t in mod._buffers.items() if n not in skip]
        transient += [dotted + n for n in skip]
        for n, t, is_param in named:
            if t is not None:
                slot = slots.setdefault(id(t), _Slot([], [], t, is_param))
                slot.names.append(dotted + n)
                slot.owners.append((mod, n))
    return list(slots.values()), transient


def _key_map(root: nn.Module, names: list[str], prefix: str, keys: set[str]) -> tuple[dict[str, str], str]:
    """Module name → file key, and the base prefix outside of which file keys are another head's (or ``""``)."""
    rel = {n: n[len(prefix) + 1 :] if prefix else n for n in names}
    dot = str(getattr(root, "base_model_prefix", "") or "") + "."
    file_has, model_has = any(k.startswith(dot) for k in keys), any(r.startswith(dot) for r in rel.values())
    if dot != "." and model_has and not file_has:
        return {n: r.removeprefix(dot) for n, r in rel.items()}, ""
    if dot != "." and file_has and not model_has:
        return {n: dot + r for n, r in rel.items()}, dot
    return rel, ""


def _match(slots: list[_Slot], key_of: dict[str, str], stored: dict[str, _Stored], init: Sequence[str]) -> list[str]:
    """Attach each slot's stored tensor; the problems: wrong shapes and tensors the files lack."""
    problems = []
    for slot in slots:
        found = [key_of[n] for n in slot.names if key_of[n] in stored]
        slot.stored = stored[found[0]] if found else None
        if slot.stored is not None and slot.stored.shape != tuple(slot.tensor.shape):
            problems.append(
                f"{slot.stored.file}: tensor {found[0]!r} has shape {list(slot.stored.shape)}, but the model's "
                f"{slot.names[0]!r} is {list(slot.tensor.shape)}"
            )
    files = sorted({str(s.file) for s in stored.values()})
    loaded_owners = {id(m) for s in slots if s.stored is not None for m, _ in s.owners}
    for slot in slots:
        if slot.stored is not None or not (slot.is_param or slot.tensor.is_meta):
            continue  # a real persistent buffer that the file lacks keeps the value __init__ gave it
        if not under(slot.names[0], init):
            problems.append(f"{_few(files)} lacks tensor {key_of[slot.names[0]]!r} (the model's {slot.names[0]!r})")
        elif any(id(m) in loaded_owners for m, _ in slot.owners):
            problems.append(f"init_missing: {slot.names[0]!r} is missing but other tensors of its module are loaded")
    return problems


def _unexpected(
    stored: dict[str, _Stored], used: set[str], foreign: str, ignorable: set[str], root: nn.Module
) -> tuple[list[str], list[str]]:
    """File keys the model has no tensor for: ``(ignored, problems)``."""
    patterns = [*_IGNORABLE, *(getattr(root, "_keys_to_ignore_on_load_unexpected", None) or ())]
    ignored, problems = [], []
    for key, entry in stored.items():
        if key in used:
            continue
        if (foreign and not key.startswith(foreign)) or key in ignorable or any(re.search(p, key) for p in patterns):
            ignored.append(key)
        else:
            problems.append(f"{entry.file}: unexpected tensor {key!r}, which the model does not have")
    return ignored, problems


def _prepare(
    model: nn.Module, source: WeightSource, plan: QuantPlan | None, init: Sequence[str]
) -> tuple[list[_Slot], dict[str, _Stored], list[str]]:
    """Match the model to the checkpoint's headers; raise one :class:`LoadError` listing every problem."""
    root = model.get_submodule(source.prefix)
    check_entries(
        list(init), [n for n, _ in model.named_modules()], "init_missing", [n for n, _ in root.named_modules()]
    )
    slots, transient = _slots(root, source.prefix)
    stored = _index(Path(source.path), [n for s in slots for n in s.names])
    key_of, foreign = _key_map(root, [n for s in slots for n in s.names] + transient, source.prefix, set(stored))
    problems = _match(slots, key_of, stored, init)
    used = {key_of[n] for s in slots for n in s.names}
    ignored, unexpected = _unexpected(stored, used, foreign, {key_of[n] for n in transient}, root)
    if problems or unexpected:
        raise LoadError(f"{source.path} does not fit the model:\n  - " + "\n  - ".join(problems + unexpected))
    selected = {n for n in plan.selected(model) if not under(n, init)} if plan is not None else set()
    for slot in slots:
        slot.layer = next((n.rpartition(".")[0] for n in slot.names if n.rpartition(".")[0] in selected), "")
    return slots, stored, ignored


# --------------------------------------------------------------------------- streaming


def _assign(slot: _Slot, value: torch.Tensor) -> None:
    """Give every name that shared the old tensor the new one: tied weights stay tied."""
    param = nn.Parameter(value, requires_grad=slot.tensor.requires_grad) if slot.is_param else None
    for module, attr in slot.owners:
        if param is not None:
            module._parameters[attr] = param
        else:
            module._buffers[attr] = value


def _load_quantized(
    model: nn.Module, name: str, parts: list[_Slot], config: QuantConfig, dtype: torch.dtype, device: torch.device
) -> None:
    """Quantize layer ``name`` from its weight (and bias) cast to fp32, as after ``from_pretrained(dtype=fp32)``.
    Its ``original_dtype`` (what :func:`~lightning_adapt.quantize.summarize` compares with) is ``dtype``."""
    old = model.get_submodule(name)
    temp = nn.Linear(old.in_features, old.out_features, bias=old.bias is not None, device="meta")  # type: ignore[arg-type]
    for slot in parts:
        assert slot.stored is not None
        value = _read(slot.stored).to(device=device, dtype=torch.float32)
        setattr(temp, slot.names[0].rpartition(".")[2], nn.Parameter(value, requires_grad=False))
    temp.train(old.training)
    layer = quantize_linear(temp, config)
    layer.original_dtype = dtype  # type: ignore[assignment]
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, layer)


def _stream(
    model: nn.Module, slots: list[_Slot], config: QuantConfig | None, dtype: torch.dtype, device: torch.device
) -> None:
    """Load the slots in file order, one tensor (or one quantized layer) at a time."""
    layers: dict[str, list[_Slot]] = {}
    for slot in slots:
        if slot.layer:
            layers.setdefault(slot.layer, []).append(slot)
    pending = [s for s in slots if s.stored is not None]
    for slot in sorted(pending, key=lambda s: (str(s.stored.file), s.stored.start)):  # type: ignore[union-attr]
        if not slot.layer and slot.stored is not None:
            source = _read(slot.stored)
            _assign(slot, source.to(device=device, dtype=dtype if source.is_floating_point() else source.dtype))
            del source  # the full-precision source is gone before the next read
        elif config is not None and slot.names[0] == slot.layer + ".weight":  # the bias comes with it
            _load_quantized(model, slot.layer, layers[slot.layer], config, dtype, device)


def _initialize(root: nn.Module, slots: list[_Slot], dtype: torch.dtype, device: torch.device) -> list[str]:
    """Materialize and initialize what the file lacks (Hugging Face ``_init_weights``, else ``reset_parameters``)."""
    todo = [s for s in slots if s.stored is None and s.tensor.is_meta]
    for slot in todo:
        t = slot.tensor
        _assign(slot, torch.empty(t.shape, dtype=dtype if t.is_floating_point() else t.dtype, device=device))
    init_weights = getattr(root, "_init_weights", None)
    with torch.no_grad():
        for module in {id(m): m for s in todo for m, _ in s.owners}.values():
            if callable(init_weights):
                init_weights(module)
            elif callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()  # type: ignore[operator]
    return [n for s in todo for n in s.names]


def _check_no_meta(model: nn.Module, files: list[str]) -> None:
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    left = [name for name, t in named if t.is_meta]
    if left:
        raise LoadError(
            f"after loading {_few(files)}, {len(left)} tensors are still on the meta device: {_few(left)}. Fix: "
            "build the model under empty_weights() (buffers stay real), check WeightSource.prefix, or list new "
            "modules in init_missing."
        )


def _weight_bytes(root: nn.Module) -> int:
    quantized = [m for _, m in quantized_layers(root)]
    skip = {id(m.weight) for m in quantized}
    tensors = {id(t): t for t in [*root.parameters(), *root.buffers()] if id(t) not in skip}
    return sum(t.nbytes for t in tensors.values()) + sum(quant_storage_bytes(m) for m in quantized)


def _resolve(plan: QuantPlan | None, dtype: torch.dtype, device: torch.device) -> QuantConfig | None:
    """The plan's config with the compute dtype ``quantize_model`` would pick after a load in ``dtype``."""
    if plan is None or plan.config.compute_dtype is not None:
        return None if plan is None else plan.config
    return replace(plan.config, compute_dtype=default_compute_dtype(torch.empty(0, dtype=dtype, device=device)))


def load_pretrained(
    model: nn.Module,
    source: WeightSource,
    *,
    plan: QuantPlan | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    init_missing: Sequence[str] = (),
    baseline_rss: int | None = None,
) -> LoadReport:
    """Fill ``model`` (built under :func:`empty_weights`) from a safetensors checkpoint, tensor by tensor.

    Args:
        model: the module to fill, in place (its ``source.prefix`` submodule is what the file describes).
        source: the checkpoint.
        plan: quantize the Linear layers it selects (selection on ``model``) as their weights arrive.
        dtype: of every other floating tensor; default ``torch.get_default_dtype()``, which Lightning sets
            to bf16 inside ``configure_model`` under ``precision="bf16-true"``.
        device: where tensors go and quantization runs; default CPU.
        init_missing: new modules absent from the checkpoint (e.g. a classification head; naming rules of
            :mod:`lightning_adapt.naming`): initialized by the model's Hugging Face ``_init_weights``, else
            ``reset_parameters()``; never quantized.
        baseline_rss: resident bytes measured before the build (:func:`current_rss_bytes`); default: now.

    Raises:
        LoadError: a missing or corrupt file, a wrong shape, a tensor the files lack, an unexpected key not
            known to be ignorable (all found from the headers, before any data is read, and reported in
            one error naming each file and tensor), or a tensor still on meta after loading.
    """
    baseline = current_rss_bytes() if baseline_rss is None else baseline_rss
    peak_before, start = peak_rss_bytes(), time.perf_counter()
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if not dtype.is_floating_point:
        raise ConfigError(f"dtype={dtype} is not a floating dtype. Fix: dtype=torch.bfloat16 or torch.float32.")
    target = torch.device("cpu" if device is None else device)
    slots, stored, ignored = _prepare(model, source, plan, init_missing)
    _stream(model, slots, _resolve(plan, dtype, target), dtype, target)
    root = model.get_submodule(source.prefix)
    initialized = _initialize(root, slots, dtype, target)
    files = sorted({str(s.file) for s in stored.values()})
    _check_no_meta(model, files)
    loaded = [s.stored for s in slots if s.stored is not None]
    return LoadReport(
        files=tuple(files),
        tensors_loaded=len(loaded),
        quantized_layers=len({s.layer for s in slots if s.layer}),
        initialized=tuple(initialized),
        ignored_keys=tuple(ignored),
        bytes_read=sum(s.nbytes for s in loaded),
        weight_bytes=_weight_bytes(root),
        largest_tensor_fp32_bytes=max((4 * math.prod(s.shape) for s in loaded), default=0),
        seconds=time.perf_counter() - start,
        baseline_rss_bytes=baseline,
        peak_rss_bytes=peak_rss_bytes(),
        peak_rss_increase_bytes=peak_rss_bytes() - peak_before,
    )
