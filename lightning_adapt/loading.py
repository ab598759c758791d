"""Build a model with empty weights, then stream a safetensors checkpoint into it, quantizing on the way::

    with empty_weights():  # parameters on meta, buffers (RoPE inv_freq) real
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    report = load_pretrained(model, WeightSource("ckpt/"), plan=QuantPlan(QuantConfig("nf4")), dtype=torch.bfloat16)

Peak memory ≈ final model + one checkpoint tensor (+ quantization temporaries). A layer the plan selects is
quantized by ``quantize_linear`` from its weight cast to fp32 as it arrives (bit-identical to an fp32 load, then
``quantize_model``); others go straight to ``dtype``. Plain reads, one tensor at a time: no mapped shard stays resident.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_adapt.adapters.init import before_quantize
from lightning_adapt.errors import SETTING, LoadError
from lightning_adapt.export.original import remember_originals
from lightning_adapt.export.safetensors_io import StoredTensor, base_prefix_rule, read_header, weight_files
from lightning_adapt.layers import is_conv1d, quant_storage_bytes, quantized_layers
from lightning_adapt.naming import check_entries, under
from lightning_adapt.quantize import (
    QuantConfig,
    QuantPlan,
    default_compute_dtype,
    quantization_roundtrip,
    quantize_linear,
)
from lightning_adapt.resources import current_rss_bytes, peak_rss_bytes

#: Stale keys of buffers that models now compute in ``__init__`` (Hugging Face ignores them too).
_IGNORABLE = (r"rotary_emb\.inv_freq$", r"(^|\.)position_ids$")
_PLAN_KEY = "_lightning_adapt_quant_plan"


@contextmanager
def empty_weights() -> Iterator[None]:
    """Build modules with their parameters on the meta device (no memory) and their buffers real, so buffers
    computed in ``__init__`` and absent from checkpoints (RoPE ``inv_freq``) keep their values. This is
    accelerate's ``init_empty_weights(include_buffers=False)``; the patch is process-wide while the block runs."""
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
        path: a directory with ``model.safetensors`` or a sharded ``model.safetensors.index.json``, or a file.
        prefix: dotted name of the submodule the file describes (``"model"`` for a LightningModule keeping its
            Hugging Face model in ``self.model``; ``""``: the whole module): file key ``k`` is ``prefix.k``.

    That submodule's Hugging Face ``base_model_prefix`` (e.g. ``"bert"``) is handled automatically: stripped
    from its names when the file's keys lack it (BertForSequenceClassification from a BertModel checkpoint),
    added when only the file has it (LlamaModel from a LlamaForCausalLM file; the file's head is ignored).
    """

    path: str | Path
    prefix: str = ""


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_pretrained` did; sizes in bytes. ``peak_rss_increase_bytes``: growth of the process's peak
    RSS (0 if an earlier peak was higher); ``load_peak_bytes``: peak over the pre-build RSS."""

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

    @property
    def load_peak_bytes(self) -> int:
        """Peak resident memory during the load above the resident memory before the model was built."""
        return self.peak_rss_bytes - self.baseline_rss_bytes


def attach_quant_plan(module: nn.Module, plan: QuantPlan | None) -> None:
    """Ask ``module`` to quantize while it loads (``None`` withdraws it): the seam for a callback that runs
    before ``configure_model``; a module loading through :func:`load_pretrained` reads :func:`quant_plan`."""
    module.__dict__[_PLAN_KEY] = plan
    if plan is None:
        del module.__dict__[_PLAN_KEY]


def quant_plan(module: nn.Module) -> QuantPlan | None:
    """The plan attached to ``module`` by :func:`attach_quant_plan`, or ``None``."""
    return module.__dict__.get(_PLAN_KEY)  # type: ignore[no-any-return]


def _few(names: Sequence[str], shown: int = 5) -> str:
    return ", ".join(map(repr, names[:shown])) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _index(path: Path, hint: Sequence[str]) -> dict[str, StoredTensor]:
    """Every tensor of the checkpoint at ``path`` by file key, from the headers alone; ``hint`` (the model's
    names) is what a single file should hold, for the error message."""
    files = weight_files(path)
    if not files:
        raise LoadError(
            f"{SETTING}={str(path)!r}: no model.safetensors or model.safetensors.index.json there (pickled .bin/.pt "
            "weights are never loaded: unpickling can run code). Fix: point it at a directory with safetensors weights "
            "(convert a .bin with `save_pretrained(..., safe_serialization=True)`).",
            setting="source",
        )

    def unreadable(file: Path, reason: Exception) -> LoadError:
        expected = files[file] or list(hint)
        return LoadError(
            f"{file}: missing or not a valid safetensors file ({reason}); it should hold {_few(expected)}. "
            "Fix: download it again."
        )

    return {k: v for file in files for k, v in read_header(file, unreadable).items()}


def _read(stored: StoredTensor) -> torch.Tensor:
    """One tensor as stored, read into fresh CPU memory (the file is not mapped)."""
    return stored.read(LoadError)


@dataclass
class _Slot:  # one parameter or persistent buffer, registered under one or more names (tied weights)
    names: list[str]
    owners: list[tuple[nn.Module, str]]
    tensor: torch.Tensor
    is_param: bool
    stored: StoredTensor | None = None
    layer: str = ""  # the quantized layer it belongs to


def _slots(root: nn.Module, prefix: str) -> list[_Slot]:
    """The loadable tensors of ``root``: parameters and persistent buffers, one slot per tensor object."""
    slots: dict[int, _Slot] = {}
    for mod_name, mod in root.named_modules(remove_duplicate=False):
        dotted = "".join(p + "." for p in (prefix, mod_name) if p)
        named = [(n, t, True) for n, t in mod._parameters.items()]
        named += [(n, t, False) for n, t in mod._buffers.items() if n not in mod._non_persistent_buffers_set]
        for n, t, is_param in named:
            if t is not None:
                slot = slots.setdefault(id(t), _Slot([], [], t, is_param))
                slot.names.append(dotted + n)
                slot.owners.append((mod, n))
    return list(slots.values())


def _key_map(root: nn.Module, names: list[str], prefix: str, keys: set[str]) -> tuple[dict[str, str], str]:
    """Module name → file key, and the base prefix outside of which file keys are another head's (or ``""``)."""
    rel = {n: n[len(prefix) + 1 :] if prefix else n for n in names}
    strip, add = base_prefix_rule(str(getattr(root, "base_model_prefix", "") or ""), rel.values(), keys)
    return {n: add + r.removeprefix(strip) for n, r in rel.items()}, add


def _match(
    slots: list[_Slot], key_of: dict[str, str], stored: dict[str, StoredTensor], init: Sequence[str]
) -> list[str]:
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


def _prepare(
    model: nn.Module, source: WeightSource, plan: QuantPlan | None, init: Sequence[str]
) -> tuple[list[_Slot], list[str], list[str]]:
    """Match the model to the headers, raising one :class:`LoadError` for every problem; mark the layers to
    quantize. Returns the slots, the files and the file keys ignored as known-ignorable."""
    root, modules = model.get_submodule(source.prefix), [n for n, _ in model.named_modules()]
    check_entries(list(init), modules, "init_missing", [n for n, _ in root.named_modules()])
    slots = _slots(root, source.prefix)
    names = [n for s in slots for n in s.names]
    stored = _index(Path(source.path), names)
    key_of, foreign = _key_map(root, names, source.prefix, set(stored))
    problems = _match(slots, key_of, stored, init)
    used, ignored = {key_of[n] for n in names}, []
    patterns = [*_IGNORABLE, *(getattr(root, "_keys_to_ignore_on_load_unexpected", None) or ())]
    for key in (k for k in stored if k not in used):
        if (foreign and not key.startswith(foreign)) or any(re.search(p, key) for p in patterns):
            ignored.append(key)
        else:
            problems.append(f"{stored[key].file}: unexpected tensor {key!r}, which the model does not have")
    if problems:
        raise LoadError(f"{source.path} does not fit the model:\n  - " + "\n  - ".join(problems))
    selected = {n for n in plan.selected(model) if not under(n, init)} if plan is not None else set()
    for slot in slots:
        slot.layer = next((n.rpartition(".")[0] for n in slot.names if n.rpartition(".")[0] in selected), "")
    return slots, sorted({str(s.file) for s in stored.values()}), ignored


def _assign(slot: _Slot, value: torch.Tensor) -> None:
    """Give every name that shared the old tensor the new one: tied weights stay tied."""
    new = nn.Parameter(value, requires_grad=slot.tensor.requires_grad) if slot.is_param else value
    for module, attr in slot.owners:
        (module._parameters if slot.is_param else module._buffers)[attr] = new  # type: ignore[assignment]


def _load_quantized(
    model: nn.Module,
    name: str,
    slots: list[_Slot],
    config: QuantConfig,
    dtype: torch.dtype,
    device: torch.device,
    changed: set[str],
) -> None:
    """Quantize layer ``name`` on ``device`` from its weight (and bias) cast to fp32, as ``quantize_model`` does
    after ``from_pretrained(dtype=torch.float32)``; its ``original_dtype`` (for ``summarize``) is ``dtype``. A layer
    of ``changed`` goes through the :func:`before_quantize` hook first (LoRA's PiSSA / OLoRA / LoftQ init: the
    fp32 weight then holds the changed base)."""
    old: Any = model.get_submodule(name)
    with torch.device("meta"):  # an empty layer of the same kind (Linear, or GPT-2's Conv1D), filled below
        temp = type(old)(old.nf, old.nx) if is_conv1d(old) else nn.Linear(old.in_features, old.out_features, False)
    for slot in slots:
        if slot.layer == name and slot.stored is not None:
            value = _read(slot.stored).to(device=device, dtype=torch.float32)
            setattr(temp, slot.names[0].rpartition(".")[2], nn.Parameter(value, requires_grad=False))
    hook, finish = before_quantize(model), None
    if hook is not None and name in changed:
        finish = hook(temp, quantization_roundtrip(config, torch.float32))
    layer = quantize_linear(temp.train(old.training), config)
    layer.original_dtype = dtype  # type: ignore[assignment]
    if finish is not None:
        finish(layer)
    setattr(model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2], layer)


def _stream(
    model: nn.Module, slots: list[_Slot], config: QuantConfig, dtype: torch.dtype, dev: torch.device, changed: set[str]
) -> None:
    """Load the slots in file order, one tensor (or one quantized layer) at a time; ``changed``: the layers the
    :func:`before_quantize` hook prepares (:func:`_load_quantized`)."""
    pending = [s for s in slots if s.stored is not None]
    for slot in sorted(pending, key=lambda s: (str(s.stored.file), s.stored.start)):  # type: ignore[union-attr]
        if slot.stored is not None and not slot.layer:
            source = _read(slot.stored)
            _assign(slot, source.to(device=dev, dtype=dtype if source.is_floating_point() else source.dtype))
            del source  # the full-precision source is freed before the next read
        elif slot.names[0] == slot.layer + ".weight":  # the bias comes with it
            _load_quantized(model, slot.layer, slots, config, dtype, dev, changed)
            with contextlib.suppress(OSError, AttributeError):  # glibc only; it would keep the freed fp32
                ctypes.CDLL(None).malloc_trim(0)  # transients resident (64M-param nf4 load: peak 1.8x final)


def _initialize(root: nn.Module, slots: list[_Slot], dtype: torch.dtype, device: torch.device) -> list[str]:
    """Materialize and initialize what the files lack: Hugging Face ``_init_weights``, else ``reset_parameters``."""
    todo = [s for s in slots if s.stored is None and s.tensor.is_meta]
    for slot in todo:
        floating = slot.tensor.is_floating_point()
        _assign(slot, torch.empty(slot.tensor.shape, dtype=dtype if floating else slot.tensor.dtype, device=device))
    init_weights = getattr(root, "_init_weights", None)
    with torch.no_grad():
        for module in {id(m): m for s in todo for m, _ in s.owners}.values():
            if callable(init_weights):
                init_weights(module)
            elif callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()  # type: ignore[operator]
    return [n for s in todo for n in s.names]


def _finish(model: nn.Module, root: nn.Module, files: list[str]) -> int:
    """Fail if any tensor is still on meta; else the bytes of ``root``'s weights (quantized: codes + state)."""
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    left = [name for name, t in named if t.is_meta]
    if left:
        raise LoadError(
            f"after loading {_few(files)}, {len(left)} tensors are still on meta: {_few(left)}. Fix: build under "
            "empty_weights() (buffers stay real), check WeightSource.prefix, or list new modules in init_missing."
        )
    quantized = {id(m.weight): m for _, m in quantized_layers(root)}
    tensors = {id(t): t for t in [*root.parameters(), *root.buffers()] if id(t) not in quantized}
    return sum(t.nbytes for t in tensors.values()) + sum(quant_storage_bytes(m) for m in quantized.values())


def _drop(model: nn.Module, prefix: str) -> None:
    """Replace the half-built network by ``None``: nothing can use it, and Lightning's teardown after the error
    moves the module to CPU, which meta tensors refuse (that error would hide ours)."""
    if prefix:
        parent, _, leaf = prefix.rpartition(".")
        setattr(model.get_submodule(parent), leaf, None)


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
        model: the module to fill, in place; its ``source.prefix`` submodule is what the files describe.
        source: the checkpoint.
        plan: quantize the Linear layers it selects in ``model`` (``quantize_model``'s rules) as they arrive.
        dtype: of every other floating tensor; default ``torch.get_default_dtype()`` (bf16 inside Lightning's
            ``configure_model`` under ``precision="bf16-true"``).
        device: where tensors go and quantization runs; default CPU.
        init_missing: new modules absent from the checkpoint (naming rules of :mod:`lightning_adapt.naming`),
            initialized by Hugging Face ``_init_weights`` if the model has it, else ``reset_parameters()``.
        baseline_rss: resident bytes before the build (:func:`current_rss_bytes`); default: now.

    On any error the ``source.prefix`` submodule is set to ``None`` (a later call may build it again).

    Raises:
        LoadError: missing or corrupt files, wrong shapes, tensors the files lack, unexpected keys not known to
            be ignorable (one error naming each file and tensor, before any data is read); meta tensors left.
    """
    baseline = current_rss_bytes() if baseline_rss is None else baseline_rss
    peak0, start = peak_rss_bytes(), time.perf_counter()
    dtype = torch.get_default_dtype() if dtype is None else dtype
    device = torch.device("cpu" if device is None else device)
    config = plan.config if plan is not None else QuantConfig()
    if config.compute_dtype is None:  # the one quantize_model would pick after a load in ``dtype``
        config = replace(config, compute_dtype=default_compute_dtype(torch.empty(0, dtype=dtype, device=device)))
    try:
        slots, files, ignored = _prepare(model, source, plan, init_missing)
        hook = before_quantize(model) if plan is not None else None
        _stream(model, slots, config, dtype, device, hook.targets(model) if hook is not None else set())
        root = model.get_submodule(source.prefix)
        initialized, weight_bytes = _initialize(root, slots, dtype, device), _finish(model, root, files)
    except BaseException:
        _drop(model, source.prefix)
        raise
    remember_originals(model, {s.names[0]: s.stored for s in slots if s.stored and s.names[0] == s.layer + ".weight"})
    loaded = [s.stored for s in slots if s.stored is not None]
    end, peak = time.perf_counter(), peak_rss_bytes()
    return LoadReport(
        files=tuple(files), tensors_loaded=len(loaded), quantized_layers=len({s.layer for s in slots if s.layer}),
        initialized=tuple(initialized), ignored_keys=tuple(ignored), bytes_read=sum(s.nbytes for s in loaded),
        weight_bytes=weight_bytes, largest_tensor_fp32_bytes=max((4 * math.prod(s.shape) for s in loaded), default=0),
        seconds=end - start, baseline_rss_bytes=baseline, peak_rss_bytes=peak, peak_rss_increase_bytes=peak - peak0,
    )  # fmt: skip
