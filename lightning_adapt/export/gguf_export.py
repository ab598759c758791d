"""The export's GGUF step (``format: gguf``): the merged model just written becomes llama.cpp's files.

:func:`check_gguf` refuses up front (before training or merging) what cannot become GGUF; :func:`merged_to_gguf`
writes ``gguf/model-<type>.gguf`` from ``merged/`` (one tensor at a time, :func:`~.gguf.write_gguf`) and, where
llama.cpp can apply them, ``gguf/adapter-f32.gguf`` from ``adapter/`` (:func:`~.gguf.write_gguf_adapter`), inside
the export's temporary directory, so the whole export stays atomic.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from lightning_adapt.errors import ExportError
from lightning_adapt.export.gguf import Quant, write_gguf, write_gguf_adapter
from lightning_adapt.export.gguf_meta import ARCHITECTURES, read_config, require_gguf
from lightning_adapt.export.safetensors_io import TensorEntry, read_index

__all__ = ["check_gguf", "merged_to_gguf"]


def check_gguf(model: Any) -> None:
    """Refuse, before anything is trained or written, a GGUF export that cannot work: no ``gguf`` package, a module
    that holds no Hugging Face model, an architecture this writer does not know. ``model``: a Hugging Face model,
    its config, or the config as a dict."""
    require_gguf()
    config = getattr(model, "config", model)
    values = config if isinstance(config, Mapping) else getattr(config, "to_dict", lambda: None)()
    if not isinstance(values, Mapping):
        raise ExportError(
            f"format='gguf': {type(model).__name__} holds no Hugging Face model, whose config.json names the "
            f"architecture GGUF needs (supported: {sorted(ARCHITECTURES)}). Fix: format: safetensors."
        )
    names = [*(values.get("architectures") or []), str(values.get("model_type"))]
    if not any(name in ARCHITECTURES for name in names):
        raise ExportError(
            f"format='gguf': architecture {names[0]!r} has no GGUF export; supported: {sorted(ARCHITECTURES)}. Fix: "
            "format: safetensors (llama.cpp's convert_hf_to_gguf.py converts more), or a supported model."
        )


@dataclass(frozen=True)
class _PEFTLayer:  # what write_gguf_adapter reads of a layer
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float
    magnitude: torch.Tensor | None = None


@dataclass(frozen=True)
class _PEFTAdapters:
    layers: dict[str, _PEFTLayer]


def _peft_adapters(folder: Path) -> _PEFTAdapters:
    """The linear LoRA layers of a PEFT adapter directory this export just wrote (names as the model's keys)."""
    config = json.loads((folder / "adapter_config.json").read_text())
    weights = load_file(folder / "adapter_model.safetensors")
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    names = [key.removesuffix(".lora_A.weight") for key in weights if key.endswith(".lora_A.weight")]
    if other := [key for key in weights if not key.endswith((".lora_A.weight", ".lora_B.weight"))]:
        raise ExportError(f"{other[0]!r} is no linear layer's LoRA factor (embedding, DoRA or a trained module)")
    return _PEFTAdapters(
        {
            name.removeprefix("base_model.model."): _PEFTLayer(
                weights[name + ".lora_A.weight"], weights[name + ".lora_B.weight"], scaling
            )
            for name in names
        }
    )


def merged_to_gguf(out: Path, quant: Quant) -> list[str]:
    """``gguf/model-<quant>.gguf`` from the merged model just written to ``out/merged`` (read one tensor at a time,
    with its config and tokenizer), which it replaces; and ``gguf/adapter-f32.gguf`` from ``out/adapter`` where
    llama.cpp can apply those adapters (one line says why not otherwise). Returns the files' paths below ``out``."""
    merged, folder = out / "merged", out / "gguf"
    check_gguf(read_config(merged))
    entries = [
        TensorEntry(key, stored.shape, stored.dtype, stored.read, stored) for key, stored in read_index(merged).items()
    ]
    folder.mkdir()
    written = [write_gguf(folder / f"model-{quant}.gguf", merged, entries, quant).path]
    if (out / "adapter").is_dir():
        try:
            adapters = _peft_adapters(out / "adapter")
            written.append(write_gguf_adapter(folder / "adapter-f32.gguf", merged, adapters, "f32").path)
        except ExportError as err:
            print(f"export: no adapter GGUF written ({err}); the model's GGUF holds the adapters merged.")
    shutil.rmtree(merged)
    return [str(path.relative_to(out)) for path in written]
