"""The original weights of a model: the Hugging Face directory it was loaded from, read tensor by tensor.

QLoRA merges into these full-precision weights (``merge_base='original'``), not the dequantized copy held
in memory; :func:`source_for` finds the directory and checks it holds every quantized layer of the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from lightning_adapt.errors import ExportError
from lightning_adapt.export.safetensors_io import SourceWeights
from lightning_adapt.layers import quantized_layers

__all__ = ["optional_source", "quantized_bases", "source_dir", "source_for"]


def quantized_bases(root: nn.Module) -> list[tuple[str, Any]]:
    """``(name, quantized layer)`` under the name its weight has in the un-adapted model."""
    return [(name.removesuffix(".base_layer"), layer) for name, layer in quantized_layers(root)]


def source_dir(module: nn.Module, root: nn.Module, source_path: str | Path | None) -> str | Path | None:
    """``source_path``, else ``module.source_path``, else the HF model's ``name_or_path``; ``None`` if none."""
    return source_path or getattr(module, "source_path", None) or getattr(root, "name_or_path", None) or None


def source_for(module: nn.Module, root: nn.Module, source_path: str | Path | None, argument: str) -> SourceWeights:
    """The original weights for every quantized layer of ``root``, checked (names, shapes) up front.

    Raises:
        ExportError: no such directory, no safetensors in it, or a quantized layer it does not match.
    """
    path = source_dir(module, root, source_path)
    if not path or not Path(path).is_dir():
        raise ExportError(
            f"{argument}={str(path) if path else None!r}: merge_base='original' needs the directory the model was "
            "loaded from, to re-read the full-precision weights of the quantized layers. Fix: set "
            f"{argument} to that safetensors directory, or use merge_base='dequantized'."
        )
    source = SourceWeights(path, str(getattr(root, "base_model_prefix", "") or ""), argument)
    bad = []
    for name, layer in quantized_bases(root):
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


def optional_source(
    module: nn.Module, root: nn.Module, source_path: str | Path | None, merge_base: str
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
