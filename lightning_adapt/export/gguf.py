"""GGUF export (llama.cpp's single-file format), streamed tensor by tensor. Pure torch + ``gguf``; no Lightning.

:func:`write_gguf` takes the merged model as a stream of :class:`TensorEntry` under Hugging Face key names (what
:mod:`~lightning_adapt.export.stream_merge` produces), plus the source directory's ``config.json`` and tokenizer
files for the metadata. The file is written in GGUF's own order, header first::

    header, metadata (architecture from config.json, tokenizer from tokenizer.json: gguf_vocab), tensor infos
    for each tensor: W' = entry.load() (read, merged), permuted (Llama q/k), converted, written, released

``gguf.GGUFWriter`` normally keeps every tensor until it writes; here every tensor's info goes in first
(``add_tensor_info``: name, shape, type, bytes) and each tensor's data follows alone (``write_tensor_data``), so
the peak is one merged tensor and its converted copy, never the model. Types: ``f32`` everywhere, or ``f16`` /
``bf16`` / ``q8_0`` for matrices with vectors (norms, biases) kept f32, as llama.cpp's converter does (a q8_0
matrix whose rows are not a multiple of 32 is written f16). q8_0 is ggml's reference rounding (``gguf.quants``).

Supported: ``LlamaForCausalLM`` (SmolLM2), ``MistralForCausalLM`` (GGUF arch ``llama``: q/k rows permuted to
llama.cpp's rotary layout) and ``Qwen2ForCausalLM`` (``qwen2``, as stored). :func:`write_gguf_adapter` writes
LoRA adapters in llama.cpp's adapter format (``--lora``). Both go through :func:`lightning_adapt.atomic.atomic_file`.

Example:
    >>> keys = model_keys(read_index("base/"))  # doctest: +SKIP
    >>> entries = _entries(keys, adapters, None, "source_path")  # doctest: +SKIP
    >>> write_gguf(Path("out/model.gguf"), Path("base/"), entries, "q8_0")  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, get_args

import numpy as np
import torch

from lightning_adapt.atomic import atomic_file, check_free_space, target_lock
from lightning_adapt.errors import ExportError, setting_names
from lightning_adapt.export.gguf_meta import (
    ARCHITECTURES,
    add_model_metadata,
    architecture,
    check_rope,
    llama3_rope_factors,
    read_config,
    require_gguf,
    rope_settings,
)
from lightning_adapt.export.gguf_vocab import add_tokenizer
from lightning_adapt.export.safetensors_io import TensorEntry, _trim_heap

if TYPE_CHECKING:
    import gguf

__all__ = [
    "ARCHITECTURES",
    "QUANTS",
    "GGUFResult",
    "LoRAAdapters",
    "LoRALayer",
    "Quant",
    "require_gguf",
    "write_gguf",
    "write_gguf_adapter",
]

Quant = Literal["f32", "f16", "bf16", "q8_0"]
QUANTS: tuple[str, ...] = get_args(Quant)
_Q8_CHUNK = 1 << 20  # elements quantized at a time: bounds q8_0's numpy temporaries


class LoRALayer(Protocol):
    """One adapted layer as :class:`~lightning_adapt.export.stream_merge.LayerAdapter` holds it (read structurally:
    this module stays below the merge engine)."""

    @property
    def lora_A(self) -> torch.Tensor: ...  # (r, in)
    @property
    def lora_B(self) -> torch.Tensor: ...  # (out, r)
    @property
    def scaling(self) -> float: ...
    @property
    def magnitude(self) -> torch.Tensor | None: ...  # DoRA


class LoRAAdapters(Protocol):
    """What :func:`write_gguf_adapter` reads of :class:`~lightning_adapt.export.stream_merge.Adapters`."""

    @property
    def layers(self) -> Mapping[str, LoRALayer]: ...


@dataclass(frozen=True)
class GGUFResult:
    """What :func:`write_gguf` / :func:`write_gguf_adapter` wrote."""

    path: Path
    architecture: str
    tensors: int
    nbytes: int  # tensor data
    largest_key: str  # the largest tensor (Hugging Face key)


@dataclass(frozen=True)
class _Planned:
    """One GGUF tensor: its name, numpy-order shape, ggml type, and how its data is made."""

    name: str
    shape: tuple[int, ...]
    qtype: int  # gguf.GGMLQuantizationType
    load: Callable[[], torch.Tensor]
    key: str


# --------------------------------------------------------------------------- config and validation


def _check_quant(quant: str) -> None:
    if quant not in QUANTS:
        raise ExportError(f"quant={quant!r} is not a GGUF type written here; allowed: {list(QUANTS)}. Fix: choose one.")


def _qtype(quant: str, shape: tuple[int, ...]) -> int:
    """The ggml type of a tensor: vectors f32 always; matrices the asked type (q8_0 needs rows of 32k)."""
    g = require_gguf()
    t = g.GGMLQuantizationType
    if quant == "f32" or len(shape) < 2:
        return int(t.F32)
    if quant == "q8_0" and shape[-1] % 32:
        return int(t.F16)
    return int({"f16": t.F16, "bf16": t.BF16, "q8_0": t.Q8_0}[quant])


# --------------------------------------------------------------------------- tensors


def _permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head from Hugging Face's rotate-half order ``[x0..x(d/2-1), y0..]`` to llama.cpp's interleaved
    pairs ``[x0, y0, x1, y1, ...]`` (both rotate the same pairs; only the row order differs)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _heads(config: Mapping[str, Any], key: str) -> int | None:
    """How many heads to permute ``key`` by (Llama's q_proj / k_proj weights and biases), else ``None``."""
    heads = int(config["num_attention_heads"])
    if ".self_attn.q_proj." in key:
        return heads
    if ".self_attn.k_proj." in key:
        return int(config.get("num_key_value_heads") or heads)
    return None


def _to_numpy(tensor: torch.Tensor, qtype: int) -> np.ndarray[Any, Any]:
    """``tensor`` in ``qtype``'s bytes (numpy order; f32/f16 as floats, bf16/q8_0 as uint8 rows)."""
    g = require_gguf()
    t = g.GGMLQuantizationType
    if qtype == t.F32:
        return tensor.to(torch.float32).contiguous().numpy()
    if qtype == t.F16:
        return tensor.to(torch.float16).contiguous().numpy()
    if qtype == t.BF16:  # torch rounds to nearest even, as ggml does
        return tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint8)
    rows = tensor.to(torch.float32).reshape(-1, tensor.shape[-1]).numpy()
    block, size = g.GGML_QUANT_SIZES[t.Q8_0]
    out = np.empty((rows.shape[0], rows.shape[1] // block * size), dtype=np.uint8)
    step = max(1, _Q8_CHUNK // rows.shape[1])
    for start in range(0, rows.shape[0], step):
        out[start : start + step] = g.quants.quantize(rows[start : start + step], t.Q8_0)
    return out.reshape(*tensor.shape[:-1], out.shape[-1])


def _nbytes(shape: tuple[int, ...], qtype: int) -> int:
    block, size = require_gguf().GGML_QUANT_SIZES[qtype]
    return int(math.prod(shape) // block * size)


def _held(tensor: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: tensor.detach().cpu()


def _entries(tensors: Iterable[TensorEntry] | Mapping[str, torch.Tensor]) -> list[TensorEntry]:
    if isinstance(tensors, Mapping):
        return [TensorEntry(k, tuple(v.shape), v.dtype, _held(v)) for k, v in tensors.items()]
    return list(tensors)


def _loader(entry: TensorEntry, heads: int | None) -> Callable[[], torch.Tensor]:
    if heads is None:
        return entry.load
    return lambda: _permute(entry.load(), heads)


def _name_map(arch: str, config: Mapping[str, Any]) -> Callable[[str], str | None]:
    g = require_gguf()
    model_arch = next(a for a, n in g.MODEL_ARCH_NAMES.items() if n == arch)
    names = g.get_tensor_name_map(model_arch, int(config["num_hidden_layers"]))
    return lambda key: names.get_name(key, try_suffixes=(".weight", ".bias"))


def _plan_model(
    entries: list[TensorEntry], config: Mapping[str, Any], quant: str, arch: str, permute: bool
) -> list[_Planned]:
    """Every tensor to write, in the entries' order: the rotary buffers and a tied ``lm_head`` left out."""
    gguf_name = _name_map(arch, config)
    planned, unknown = [], []
    for entry in entries:
        if entry.key.endswith("rotary_emb.inv_freq") or (
            entry.key == "lm_head.weight" and config.get("tie_word_embeddings")
        ):
            continue
        name = gguf_name(entry.key)
        if name is None:
            unknown.append(entry.key)
            continue
        heads = _heads(config, entry.key) if permute else None
        planned.append(_Planned(name, entry.shape, _qtype(quant, entry.shape), _loader(entry, heads), entry.key))
    if unknown:
        raise ExportError(
            f"tensors: {len(unknown)} tensors have no {arch} GGUF name ({unknown[:5]}). Fix: export a plain "
            f"{sorted(ARCHITECTURES)} checkpoint (no extra heads or modules)."
        )
    return planned


def _rope_freqs(config: Mapping[str, Any], arch: str) -> list[_Planned]:
    """Llama 3.1's rope scaling as llama.cpp reads it: a ``rope_freqs`` tensor (none for other rope types)."""
    theta, params = rope_settings(config)
    if arch != "llama" or params["rope_type"] != "llama3":
        return []
    factors = llama3_rope_factors(config, theta, params)
    return [_Planned("rope_freqs.weight", tuple(factors.shape), _qtype("f32", ()), lambda: factors, "rope_freqs")]


# --------------------------------------------------------------------------- writing


def _write(out_file: Path, writer: gguf.GGUFWriter, planned: list[_Planned], overwrite: bool) -> int:
    """Write ``planned`` into ``out_file`` atomically, header first, then one tensor at a time; returns the data bytes."""
    g = require_gguf()
    if out_file.exists() and not overwrite:
        raise ExportError(
            f"out_file={str(out_file)!r} exists. Fix: choose a new path, or allow replacing it (overwrite: true)."
        )
    nbytes = sum(_nbytes(p.shape, p.qtype) for p in planned)
    with setting_names(target="out_file"):
        check_free_space(out_file.parent, nbytes)
    for p in planned:  # shapes are element shapes: gguf converts them only for uint8 byte shapes
        writer.add_tensor_info(
            p.name, p.shape, np.dtype(np.float32), _nbytes(p.shape, p.qtype), g.GGMLQuantizationType(p.qtype)
        )
    with setting_names(target="out_file"), target_lock(out_file), atomic_file(out_file) as handle:
        try:  # the writer opens the temp file by name; atomic_file then fsyncs and renames it
            writer.write_header_to_file(Path(handle.name))
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for p in planned:
                data = _to_numpy(p.load(), p.qtype)
                writer.write_tensor_data(data)
                del data  # released before the next tensor is loaded: one at a time
                _trim_heap()
        finally:
            writer.close()
    return nbytes


def _largest(planned: list[_Planned]) -> str:
    return max(planned, key=lambda p: math.prod(p.shape)).key if planned else ""


@torch.no_grad()
def write_gguf(
    out_file: Path,
    source_dir: Path,
    tensors: Iterable[TensorEntry] | Mapping[str, torch.Tensor],
    quant: Quant = "f16",
    *,
    overwrite: bool = False,
) -> GGUFResult:
    """Write the model ``tensors`` as one GGUF file for llama.cpp, streamed (see the module docstring).

    Args:
        out_file: the ``.gguf`` file; replaced atomically (previous or new file, never half of one).
        source_dir: the Hugging Face directory holding ``config.json`` and the tokenizer (``tokenizer.json``,
            ``tokenizer_config.json``, ``chat_template.jinja``).
        tensors: the merged model under Hugging Face keys: :class:`TensorEntry` (loaded one at a time) or tensors.
        quant: ``f32``, ``f16``, ``bf16`` or ``q8_0`` for the matrices; vectors are always f32.
        overwrite: replace an existing ``out_file``.

    Raises:
        ExportError: an unsupported architecture, rope scaling, tokenizer or ``quant``, no config.json or
            tokenizer.json, a tensor without a GGUF name, ``out_file`` exists (without ``overwrite``).
    """
    _check_quant(quant)
    config = read_config(Path(source_dir))
    arch, permute = architecture(config, Path(source_dir))
    check_rope(config, Path(source_dir))
    planned = _plan_model(_entries(tensors), config, quant, arch, permute) + _rope_freqs(config, arch)
    embedding = next((p for p in planned if p.name == "token_embd.weight"), None)
    n_vocab = embedding.shape[0] if embedding else int(config["vocab_size"])
    writer = require_gguf().GGUFWriter(None, arch)
    add_model_metadata(writer, config, quant, Path(source_dir))
    writer.add_vocab_size(n_vocab)
    add_tokenizer(writer, Path(source_dir), n_vocab)
    nbytes = _write(Path(out_file), writer, planned, overwrite)
    return GGUFResult(Path(out_file), arch, len(planned), nbytes, _largest(planned))


def _adapter_alpha(adapters: LoRAAdapters) -> float:
    """llama.cpp's one ``adapter.lora.alpha`` (scale = alpha / r): ``scaling · r``, which must agree for all layers."""
    alphas = {round(a.scaling * a.lora_A.shape[0], 6) for a in adapters.layers.values()}
    dora = [name for name, a in adapters.layers.items() if a.magnitude is not None]
    if dora or len(alphas) != 1:
        raise ExportError(
            f"adapters: llama.cpp's LoRA adapters have one scale alpha/r and no DoRA; these have "
            f"{'DoRA layers ' + str(dora[:3]) if dora else 'alpha·r/r scales ' + str(sorted(alphas))}. Fix: use "
            "the merged GGUF export instead (write_gguf), which folds any adapter in."
        )
    return alphas.pop()


@torch.no_grad()
def write_gguf_adapter(
    out_file: Path, source_dir: Path, adapters: LoRAAdapters, quant: Quant = "f32", *, overwrite: bool = False
) -> GGUFResult:
    """Write the LoRA ``adapters`` as a llama.cpp adapter GGUF (``llama-cli -m base.gguf --lora out_file``):
    ``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha``, and per adapted layer
    ``<gguf name>.lora_a`` (r, in) and ``.lora_b`` (out, r), Llama's q/k ``B`` rows permuted as the base's are.

    Args:
        out_file: the ``.gguf`` file, replaced atomically.
        source_dir: the base model's Hugging Face directory (its ``config.json`` names the architecture).
        adapters: the layers' ``A``, ``B`` and scaling (:class:`~lightning_adapt.export.stream_merge.Adapters`;
            ``replace`` / ``modules_to_save`` tensors have no place in a llama.cpp adapter and are left out).
        quant: type of the adapter matrices.
        overwrite: replace an existing ``out_file``.

    Raises:
        ExportError: unsupported architecture or ``quant``, DoRA, layers with different scales, a layer
            without a GGUF name, ``out_file`` exists.
    """
    _check_quant(quant)
    config = read_config(Path(source_dir))
    arch, permute = architecture(config, Path(source_dir))
    alpha = _adapter_alpha(adapters)
    entries = [
        TensorEntry(n + ".weight", tuple(a.lora_B.shape), a.lora_B.dtype, _held(a.lora_B))
        for n, a in adapters.layers.items()
    ]
    planned = []
    for p in _plan_model(entries, config, quant, arch, permute):  # B's rows are the base weight's: permuted alike
        lora_a = adapters.layers[p.key.removesuffix(".weight")].lora_A
        shape = tuple(lora_a.shape)
        planned.append(_Planned(p.name + ".lora_a", shape, _qtype(quant, shape), _held(lora_a), p.key))
        planned.append(_Planned(p.name + ".lora_b", p.shape, p.qtype, p.load, p.key))
    writer = require_gguf().GGUFWriter(None, arch)
    writer.add_type("adapter")
    writer.add_string(require_gguf().Keys.Adapter.TYPE, "lora")
    writer.add_float32(require_gguf().Keys.Adapter.LORA_ALPHA, alpha)
    nbytes = _write(Path(out_file), writer, planned, overwrite)
    return GGUFResult(Path(out_file), arch, len(planned), nbytes, _largest(planned))
