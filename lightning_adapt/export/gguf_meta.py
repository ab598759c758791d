"""What a GGUF file says about the model besides its tensors: the architecture and hyperparameters, read from the
Hugging Face ``config.json`` (pure standard library + torch + ``gguf``). The tokenizer's part is :mod:`gguf_vocab`."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch

from lightning_adapt.errors import ExportError, require

if TYPE_CHECKING:
    import gguf

__all__ = [
    "ARCHITECTURES",
    "add_model_metadata",
    "architecture",
    "check_rope",
    "llama3_rope_factors",
    "read_config",
    "require_gguf",
    "rope_settings",
]

#: Hugging Face architecture -> (GGUF architecture, q/k rows permuted to llama.cpp's rotary layout)
ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "LlamaForCausalLM": ("llama", True),
    "MistralForCausalLM": ("llama", True),
    "Qwen2ForCausalLM": ("qwen2", False),
}
_FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}  # gguf.LlamaFileType


def require_gguf() -> ModuleType:
    """Import and return ``gguf``; raise a :class:`MissingDependencyError` (an ``ImportError``) saying how."""
    return require(
        "gguf", "GGUF export needs the gguf package. Fix: `pip install 'lightning-adapt[gguf]'` (or 'gguf>=0.19')."
    )


def read_config(source_dir: Path) -> dict[str, Any]:
    file = source_dir / "config.json"
    if not file.is_file():
        raise ExportError(
            f"source_dir={str(source_dir)!r} has no config.json: the GGUF metadata (layers, heads, rope) comes from "
            "it. Fix: point source_dir at the Hugging Face model directory the weights came from."
        )
    config: dict[str, Any] = json.loads(file.read_text())
    return config


def architecture(config: Mapping[str, Any], source_dir: Path) -> tuple[str, bool]:
    names = config.get("architectures") or [str(config.get("model_type"))]
    found = next((ARCHITECTURES[n] for n in names if n in ARCHITECTURES), None)
    if found is None:
        raise ExportError(
            f"source_dir={str(source_dir)!r}: architecture {names[0]!r} has no GGUF export; supported: "
            f"{sorted(ARCHITECTURES)}. Fix: export --format safetensors (and convert it with llama.cpp's "
            "convert_hf_to_gguf.py), or choose a supported model."
        )
    return found


def rope_settings(config: Mapping[str, Any]) -> tuple[float, dict[str, Any]]:
    """``(rope theta, rope scaling parameters)`` from transformers 5's ``rope_parameters`` or 4's keys."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = float(config.get("rope_theta") or params.get("rope_theta") or 10000.0)
    params.setdefault("rope_type", params.get("type", "default"))
    return theta, params


def llama3_rope_factors(config: Mapping[str, Any], theta: float, params: Mapping[str, Any]) -> torch.Tensor:
    """Llama 3.1's frequency-dependent rope scaling as llama.cpp takes it: one divisor per rotary frequency
    (``rope_freqs``): 1 for short wavelengths, ``factor`` for long ones, interpolated smoothly between."""
    head_dim = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    factor, low, high = float(params["factor"]), float(params["low_freq_factor"]), float(params["high_freq_factor"])
    old = float(params["original_max_position_embeddings"])
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    smooth = ((old / wavelen - low) / (high - low)).clamp(0, 1)
    factors = 1 / ((1 - smooth) / factor + smooth)
    return factors.to(torch.float32)


def add_model_metadata(writer: gguf.GGUFWriter, config: Mapping[str, Any], quant: str, source_dir: Path) -> None:
    heads, hidden = int(config["num_attention_heads"]), int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    writer.add_type("model")
    writer.add_name(str(config.get("_name_or_path") or source_dir.name))
    writer.add_file_type(_FILE_TYPES[quant])
    if quant == "q8_0":
        writer.add_quantization_version(require_gguf().GGML_QUANT_VERSION)
    writer.add_context_length(int(config.get("max_position_embeddings") or 2048))
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != hidden // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    theta, params = rope_settings(config)
    writer.add_rope_freq_base(theta)
    if params["rope_type"] == "linear":
        writer.add_rope_scaling_type(require_gguf().RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))


def check_rope(config: Mapping[str, Any], source_dir: Path) -> None:
    kind = rope_settings(config)[1]["rope_type"]
    if kind not in ("default", "linear", "llama3"):
        raise ExportError(
            f"source_dir={str(source_dir)!r}: rope scaling {kind!r} is not written to GGUF here; supported: "
            "['default', 'linear', 'llama3']. Fix: export --format safetensors and convert it with llama.cpp's "
            "convert_hf_to_gguf.py."
        )
