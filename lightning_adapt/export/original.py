"""The original weights of a quantized model: where QLoRA's ``merge_base='original'`` re-reads them from.

Three places hold them, tried in this order:

1. the Hugging Face directory the model was loaded from (an explicit ``source_path``, the module's
   ``source_path``, the HF model's ``name_or_path``);
2. the tensors :func:`remember_originals` recorded on the module: :func:`lightning_adapt.loading.load_pretrained`
   records where each layer it quantized lies in its files, and :func:`spill_originals` writes the weights of a
   module built in full precision (in ``__init__``) to a safetensors file before they are quantized;
3. nothing: then :func:`source_for` says so, and ``MergeOnSaveCallback`` says it before the first step.

Recorded tensors are keyed by the module's own parameter names (``net.0.weight``), each a
:class:`~lightning_adapt.export.safetensors_io.StoredTensor`: a place in a file, never a tensor in memory.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from lightning_adapt.atomic import atomic_file, check_free_space
from lightning_adapt.errors import SETTING, ExportError, setting_names
from lightning_adapt.export.safetensors_io import SourceWeights, StoredTensor, TensorEntry, stream_safetensors
from lightning_adapt.hub import is_hub_id
from lightning_adapt.layers import quantized_layers, stored_shape

__all__ = [
    "optional_source",
    "quantized_bases",
    "remember_originals",
    "request_spill",
    "source_dir",
    "source_for",
    "spill_originals",
    "spill_target",
]

_RECORDED = "_lightning_adapt_originals"
_SPILL = "_lightning_adapt_spill_to"
SPILL_FILE = "original_weights.safetensors"


def quantized_bases(root: nn.Module) -> list[tuple[str, Any]]:
    """``(name, quantized layer)`` under the name its weight has in the un-adapted model."""
    return [(name.removesuffix(".base_layer"), layer) for name, layer in quantized_layers(root)]


def remember_originals(module: nn.Module, tensors: dict[str, StoredTensor]) -> None:
    """Record where the full-precision weights of ``module``'s parameters lie (keys: the module's names)."""
    module.__dict__.setdefault(_RECORDED, {}).update(tensors)


def request_spill(module: nn.Module, directory: Path | None) -> None:
    """Ask the quantization of ``module`` to write the weights it is about to quantize into ``directory`` first
    (:func:`spill_originals`), unless a source holds them; ``None`` withdraws the request."""
    module.__dict__[_SPILL] = directory
    if directory is None:
        del module.__dict__[_SPILL]


def spill_target(module: nn.Module) -> Path | None:
    """The directory :func:`request_spill` asked for, or ``None``."""
    target: Path | None = module.__dict__.get(_SPILL)
    return target


def spill_originals(module: nn.Module, layer_names: list[str], directory: Path) -> int:
    """Write the weights of ``module``'s Linear layers ``layer_names`` (about to be quantized) that no source holds
    into ``directory/original_weights.safetensors``, one tensor after another (nothing is copied in memory), and
    record them. Returns the bytes written (0 when every weight already has a source)."""
    weights = {name + ".weight": cast(torch.Tensor, module.get_submodule(name).weight) for name in layer_names}
    known = _known_shapes(module)
    missing = {key: w for key, w in weights.items() if known(key) != tuple(w.shape)}
    if not missing:
        return 0
    entries = [TensorEntry(key, tuple(w.shape), w.dtype, functools.partial(_host, w)) for key, w in missing.items()]
    path = Path(directory) / SPILL_FILE
    needed = sum(w.numel() * w.element_size() for w in missing.values())
    with setting_names(target="the run's original_weights"):
        check_free_space(path, needed, ", or merge_base='dequantized' (then no copy is kept)")
    with atomic_file(path) as handle:
        size = stream_safetensors(handle, entries, None)
    remember_originals(module, SourceWeights(path.parent, files=[path]).tensors)
    return size


def _host(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().cpu()


def _known_shapes(module: nn.Module) -> Callable[[str], tuple[int, ...] | None]:
    """``key -> shape`` of the original of ``module``'s parameter ``key`` where one is known (recorded, or in the
    source directory, whose headers are read once here), else ``None``."""
    recorded: dict[str, StoredTensor] = module.__dict__.get(_RECORDED, {})
    prefix, root = next(
        ((name + "." if name else "", sub) for name, sub in module.named_modules() if _is_hf(sub)), ("", module)
    )  # the outermost Hugging Face model, as export_root finds it
    path = source_dir(module, root, None)
    source = None
    if path and Path(path).is_dir():
        with contextlib.suppress(ExportError):
            source = SourceWeights(path, str(getattr(root, "base_model_prefix", "") or ""))

    def shape(key: str) -> tuple[int, ...] | None:
        if key in recorded:
            return recorded[key].shape
        return source.shape(key[len(prefix) :]) if source is not None and key.startswith(prefix) else None

    return shape


def _is_hf(module: nn.Module) -> bool:
    pretrained = getattr(sys.modules.get("transformers"), "PreTrainedModel", None)  # never imported here (seconds)
    return isinstance(pretrained, type) and isinstance(module, pretrained)


def base_model_name(module: nn.Module, fallback: str | None) -> str | None:
    """What a PEFT adapter names as its base (``base_model_name_or_path``): the Hub id the module was loaded from
    (``PeftModel.from_pretrained`` and ``from_pretrained`` resolve it on any machine), else ``fallback``."""
    name = (getattr(module, "hparams", None) or {}).get("model_name_or_path")
    return name if isinstance(name, str) and is_hub_id(name) else fallback


def source_dir(module: nn.Module, root: nn.Module, source_path: str | Path | None) -> str | Path | None:
    """``source_path``, else ``module.source_path``, else the HF model's ``name_or_path``; ``None`` if none."""
    return source_path or getattr(module, "source_path", None) or getattr(root, "name_or_path", None) or None


def _recorded_source(module: nn.Module, root: nn.Module) -> SourceWeights | None:
    """The recorded originals of ``root``'s quantized layers, keyed relative to ``root``; ``None`` unless all are."""
    recorded: dict[str, StoredTensor] = module.__dict__.get(_RECORDED, {})
    prefix = next((name + "." for name, m in module.named_modules() if m is root and name), "")
    wanted = {name + ".weight": prefix + name + ".weight" for name, _ in quantized_bases(root)}
    if not recorded or not all(key in recorded for key in wanted.values()):
        return None
    tensors = {rel: recorded[key] for rel, key in wanted.items()}
    return SourceWeights(tensors[next(iter(tensors))].file.parent, tensors=tensors) if tensors else None


def source_for(module: nn.Module, root: nn.Module, source_path: str | Path | None) -> SourceWeights:
    """The original weights for every quantized layer of ``root``, checked (names, shapes) up front.

    Raises:
        ExportError: no source holds them, or the one found does not match a quantized layer.
    """
    path = source_dir(module, root, source_path)
    recorded = None if source_path else _recorded_source(module, root)
    if recorded is not None and not (path and Path(path).is_dir()):
        return recorded
    if path and not Path(path).is_dir():
        raise ExportError(
            f"{SETTING}={str(path)!r}: no such directory to re-read the full-precision weights of the quantized "
            "layers from (merge_base='original'). Fix: point it at the safetensors directory the model was loaded "
            "from, or use merge_base='dequantized'.",
            setting="source_path",
        )
    if not path:
        names = [name for name, _ in quantized_bases(root)]
        raise ExportError(
            f"merge_base='original': the full-precision weights of the {len(names)} quantized layer(s) "
            f"({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}) are nowhere to re-read: the model was "
            "quantized before QuantizeBaseCallback ran, not loaded through lightning_adapt.loading.load_pretrained, "
            "and has no Hugging Face source directory. Fix: let QuantizeBaseCallback quantize it (build it in full "
            "precision in __init__ or configure_model), load it with load_pretrained, or use merge_base='dequantized'."
        )
    source = SourceWeights(path, str(getattr(root, "base_model_prefix", "") or ""))
    bad = []
    for name, layer in quantized_bases(root):
        want = stored_shape(layer)
        got = source.shape(name + ".weight")
        if got != want:
            bad.append(f"{name}.weight: source {got} vs model {want}")
    if bad and recorded is not None:
        return recorded
    if bad:
        raise ExportError(
            f"{SETTING}={str(path)!r} does not hold this model's weights ({'; '.join(bad[:3])}). Fix: point it at "
            "the checkpoint the model was loaded from, or use merge_base='dequantized'.",
            setting="source_path",
        )
    return source


def optional_source(
    module: nn.Module, root: nn.Module, source_path: str | Path | None, merge_base: str
) -> SourceWeights | None:
    """The source for a model with quantized layers: required for ``original``; for ``dequantized`` it
    only feeds the report, so it is ``None`` when it is not there."""
    if not quantized_layers(root):
        return None
    try:
        return source_for(module, root, source_path)
    except ExportError:
        if merge_base == "original":
            raise
        return None
