"""NF4 / FP4 / int8 weight quantization of ``nn.Linear`` layers through bitsandbytes' public API.

A quantized layer stores ``W`` (out, in) as packed codes plus quantization state and computes
``y = x · dequant(W)ᵀ + b``:

- ``nf4`` / ``fp4``: 4-bit codes, one absmax per block of ``blocksize`` weights
  (``4 + 32/blocksize`` bits/param; with ``double_quant`` the absmaxes are 8-bit in blocks of 256:
  ``4 + 8/blocksize + 32/(blocksize·256)`` ≈ 4.127 bits at blocksize 64). Layer: ``bnb.nn.Linear4bit``.
- ``int8``: LLM.int8 row-wise codes, one fp32 scale per output row (``8 + 32/in_features`` bits/param).
  Layer: ``bnb.nn.Linear8bitLt``.

Each layer also holds a constant-size code table (16 fp32 values for 4-bit, 256 more with double
quantization); :func:`quant_storage_bytes` counts it, so small layers sit a little above the figures.

Example:
    >>> summary = quantize_model(model, QuantConfig(mode="nf4"))  # doctest: +SKIP
    >>> print(summary.format())  # doctest: +SKIP
    quantized 154 Linear layers (nf4+dq): 12.3 MB (4.127 bits/param) vs 49.1 MB fp32, saves 36.8 MB
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal, get_args

import torch
from torch import nn

from lightning_adapt.targeting import matches, output_head_names

QuantMode = Literal["nf4", "fp4", "int8"]

_MODES: tuple[str, ...] = get_args(QuantMode)
_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes' quantize_4bit check
_COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_STORAGE_DTYPES = (torch.uint8, torch.int8, torch.bfloat16, torch.float16, torch.float32)
_ADAPTER_COMPONENTS = frozenset({"lora_A", "lora_B"})


def require_bitsandbytes() -> ModuleType:
    """Import and return ``bitsandbytes``; raise an ``ImportError`` saying how to install it."""
    try:
        return importlib.import_module("bitsandbytes")
    except ImportError as err:
        raise ImportError(
            "Quantization (QLoRA, nf4/fp4/int8) needs bitsandbytes: `pip install bitsandbytes>=0.48`."
        ) from err


@dataclass(frozen=True)
class QuantConfig:
    """How :func:`quantize_linear` / :func:`quantize_model` store frozen Linear weights.

    Args:
        mode: ``"nf4"`` (QLoRA's 4-bit normal float), ``"fp4"`` (4-bit float) or ``"int8"`` (LLM.int8,
            one scale per output row).
        double_quant: 4-bit only: quantize the per-block absmax constants to 8 bits (saves ≈0.37
            bits/param). Must be ``False`` for ``"int8"``.
        blocksize: 4-bit only: weights per absmax constant; one of 32, 64, ..., 4096.
        compute_dtype: dtype the matmul runs in (4-bit) and the bias is stored in; bfloat16, float16
            or float32.
        quant_storage: 4-bit only: dtype of the tensor holding packed codes (non-uint8 is for FSDP).
    """

    mode: QuantMode = "nf4"
    double_quant: bool = True
    blocksize: int = 64
    compute_dtype: torch.dtype = torch.bfloat16
    quant_storage: torch.dtype = torch.uint8

    def __post_init__(self) -> None:
        problems = _config_problems(self)
        if problems:
            raise ValueError("Invalid QuantConfig:\n  - " + "\n  - ".join(problems))

    @property
    def label(self) -> str:
        """Short name of the format, e.g. ``"nf4+dq"``."""
        return self.mode + ("+dq" if self.double_quant and self.mode != "int8" else "")


def _config_problems(cfg: QuantConfig) -> list[str]:
    int8, four_bit = cfg.mode == "int8", cfg.mode in ("nf4", "fp4")
    rules = [
        (
            cfg.mode not in _MODES,
            f"mode={cfg.mode!r} is unknown; allowed: {_MODES}. Fix: mode='nf4' (QLoRA).",
        ),
        (not isinstance(cfg.double_quant, bool), f"double_quant={cfg.double_quant!r}; allowed: True, False."),
        (
            cfg.compute_dtype not in _COMPUTE_DTYPES,
            f"compute_dtype={cfg.compute_dtype} is not supported by bitsandbytes {cfg.mode} layers; "
            f"allowed: {_COMPUTE_DTYPES}. Fix: compute_dtype=torch.bfloat16.",
        ),
        (
            int8 and cfg.double_quant is True,
            "double_quant=True does not apply to mode='int8' (one fp32 scale per row, no block constants "
            "to quantize); allowed: False. Fix: double_quant=False.",
        ),
        (
            int8 and cfg.quant_storage != torch.uint8,
            f"quant_storage={cfg.quant_storage} applies to 4-bit modes only (int8 codes are torch.int8); "
            "allowed: torch.uint8 (the default). Fix: drop quant_storage, or use mode='nf4'.",
        ),
        (
            int8 and cfg.blocksize != 64,
            f"blocksize={cfg.blocksize!r} applies to 4-bit modes only (int8 scales whole rows); "
            "allowed: 64 (the default). Fix: drop blocksize, or use mode='nf4'.",
        ),
        (
            four_bit and (isinstance(cfg.blocksize, bool) or cfg.blocksize not in _BLOCKSIZES),
            f"blocksize={cfg.blocksize!r} is not supported by bitsandbytes; allowed: {_BLOCKSIZES}. "
            "Fix: blocksize=64 (QLoRA's value).",
        ),
        (
            four_bit and cfg.quant_storage not in _STORAGE_DTYPES,
            f"quant_storage={cfg.quant_storage}; allowed: {_STORAGE_DTYPES}. Fix: quant_storage=torch.uint8.",
        ),
    ]
    return [message for bad, message in rules if bad]


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes Linear4bit / Linear8bitLt holding quantized weights."""
    bnb = sys.modules.get("bitsandbytes")  # never imported → no module can be a bnb layer
    if bnb is None:
        return False
    if isinstance(module, bnb.nn.Linear4bit):
        return bool(getattr(module.weight, "bnb_quantized", False))
    if isinstance(module, bnb.nn.Linear8bitLt):
        return bool(module.weight.dtype == torch.int8)
    return False


def _shape(linear: nn.Linear) -> tuple[int, int, bool]:
    return linear.in_features, linear.out_features, linear.bias is not None


def _quantize_4bit(linear: nn.Linear, cfg: QuantConfig, bnb: Any) -> Any:
    weight = linear.weight.detach()
    weight = weight if weight.dtype in _COMPUTE_DTYPES else weight.float()
    opts = {
        "compress_statistics": cfg.double_quant,
        "quant_type": cfg.mode,
        "quant_storage": cfg.quant_storage,
    }
    packed, state = bnb.functional.quantize_4bit(weight.contiguous(), blocksize=cfg.blocksize, **opts)
    # Dequantize straight to the compute dtype: the codes are the same, but an fp32 source would
    # otherwise make every forward/backward unpack to fp32 and cast again (measured 1.2-1.4x slower).
    state.dtype = cfg.compute_dtype
    # built on meta so no throwaway fp weight is allocated; the real one is assigned below
    layer = bnb.nn.Linear4bit(*_shape(linear), compute_dtype=cfg.compute_dtype, device="meta", **opts)
    layer.weight = bnb.nn.Params4bit(packed, False, state, cfg.blocksize, module=layer, bnb_quantized=True, **opts)
    layer.quant_state = state
    return layer


def _quantize_int8(linear: nn.Linear, cfg: QuantConfig, bnb: Any) -> Any:
    # bitsandbytes' own Int8Params quantizes from fp16; do the same so results match its layers.
    codes, scales, _ = bnb.functional.int8_vectorwise_quant(linear.weight.detach().to(torch.float16))
    layer = bnb.nn.Linear8bitLt(*_shape(linear), has_fp16_weights=False, threshold=0.0, device="meta")
    layer.weight = bnb.nn.Int8Params(codes, requires_grad=False, has_fp16_weights=False, CB=codes, SCB=scales)
    return layer


_QUANTIZERS: dict[str, Callable[[nn.Linear, QuantConfig, Any], Any]] = {
    "nf4": _quantize_4bit,
    "fp4": _quantize_4bit,
    "int8": _quantize_int8,
}


def quantize_linear(linear: nn.Linear, config: QuantConfig) -> nn.Module:
    """Return a frozen bitsandbytes copy of ``linear`` (``Linear4bit`` or ``Linear8bitLt``).

    Quantizes on ``linear``'s device (CPU or CUDA); the bias is kept in ``config.compute_dtype``;
    every parameter has ``requires_grad=False``. ``linear`` itself is not modified. The CPU
    AVX512-BF16 fast path is switched off: it repacks the weight in place on an eval-mode forward,
    after which dequantization is silently wrong.
    """
    if linear.weight.device.type == "meta":
        raise ValueError("quantize_linear needs real weights, got a Linear on the meta device: load them first.")
    layer: nn.Module = _QUANTIZERS[config.mode](linear, config, require_bitsandbytes())
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().to(config.compute_dtype), requires_grad=False)
    if hasattr(layer, "support_avx512bf16_for_cpu"):
        layer.support_avx512bf16_for_cpu = False  # type: ignore[assignment]
    layer.original_dtype = linear.weight.dtype  # type: ignore[assignment]
    layer.train(linear.training)
    return layer.requires_grad_(False)


def _int8_scales(module: Any) -> torch.Tensor:
    # Before the first forward the scales live on the weight, afterwards on the matmul state.
    scales = getattr(module.weight, "SCB", None)
    return module.state.SCB if scales is None else scales  # type: ignore[no-any-return]


def dequantize_weight(module: nn.Module) -> torch.Tensor:
    """Dense fp32 ``(out, in)`` weight of a quantized layer, as bitsandbytes dequantizes it.

    A plain ``nn.Linear`` returns its weight in fp32 (detached copy semantics not guaranteed).
    """
    if not is_quantized(module):
        if isinstance(module, nn.Linear):
            return module.weight.detach().float()
        raise TypeError(f"dequantize_weight expects a quantized or plain Linear, got {type(module).__name__}")
    bnb = require_bitsandbytes()
    weight: Any = module.weight
    if isinstance(module, bnb.nn.Linear4bit):
        state = weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            raise RuntimeError(
                "This Linear4bit was repacked by bitsandbytes' CPU AVX512-BF16 path; its codes no longer "
                "dequantize correctly. Use lightning_adapt.quant.quantize_linear (it disables that)."
            )
        return bnb.functional.dequantize_4bit(weight.data, state).float()  # type: ignore[no-any-return]
    return bnb.functional.int8_vectorwise_dequant(weight.data, _int8_scales(module)).float()  # type: ignore[no-any-return]


def _state_tensors(module: Any) -> Iterator[torch.Tensor]:
    bnb = require_bitsandbytes()
    yield module.weight.data
    if isinstance(module, bnb.nn.Linear4bit):
        state = module.weight.quant_state
        yield from (state.absmax, state.code)
        if state.nested:
            yield from (state.offset, state.state2.absmax, state.state2.code)
    else:
        yield _int8_scales(module)


def quant_storage_bytes(module: nn.Module) -> int:
    """Bytes of a quantized layer's weight: packed codes + quant state (absmax, nested absmax, code
    tables, offset; int8: row scales). Counted as serialized, per layer. 0 for other modules."""
    if not is_quantized(module):
        return 0
    return sum(t.numel() * t.element_size() for t in _state_tensors(module))


def _layer_label(module: Any) -> str:
    weight = module.weight
    if hasattr(weight, "quant_type"):
        return str(weight.quant_type) + ("+dq" if weight.compress_statistics else "")
    return "int8"


def _original_dtype(module: Any) -> torch.dtype:
    # set by quantize_linear; for layers quantized elsewhere: the dtype bnb quantized from
    fallback = getattr(getattr(module.weight, "quant_state", None), "dtype", torch.float16)
    return getattr(module, "original_dtype", fallback)  # type: ignore[no-any-return]


_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


@dataclass(frozen=True)
class QuantSummary:
    """What quantization did: ``layers`` quantized Linear layers with ``params`` weights in total,
    stored in ``quantized_bytes`` (codes + quant state) instead of ``original_bytes``."""

    layers: int
    params: int
    quantized_bytes: int
    original_bytes: int
    label: str = ""
    original_dtype: str = ""

    @property
    def bits_per_param(self) -> float:
        return 8 * self.quantized_bytes / self.params if self.params else 0.0

    @property
    def saved_bytes(self) -> int:
        return self.original_bytes - self.quantized_bytes

    def format(self) -> str:
        """One human line, e.g. ``quantized 154 Linear layers (nf4+dq): 12.3 MB (4.127 bits/param) ...``."""
        label, size = self.label or "none", self.quantized_bytes / 1e6
        return (
            f"quantized {self.layers} Linear layers ({label}): {size:.1f} MB "
            f"({self.bits_per_param:.3f} bits/param) vs {self.original_bytes / 1e6:.1f} MB "
            f"{self.original_dtype or 'original'}, saves {self.saved_bytes / 1e6:.1f} MB"
        )


def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(dotted name, layer)`` for every quantized layer in ``model``, in module order."""
    return [(name, module) for name, module in model.named_modules() if is_quantized(module)]


def summarize(model: nn.Module) -> QuantSummary:
    """A :class:`QuantSummary` over every quantized layer currently in ``model``."""
    layers: list[Any] = [module for _, module in quantized_layers(model)]
    params: list[int] = [module.in_features * module.out_features for module in layers]
    dtypes = [_original_dtype(module) for module in layers]
    original = sum(n * torch.empty((), dtype=d).element_size() for n, d in zip(params, dtypes, strict=True))
    return QuantSummary(
        layers=len(layers),
        params=sum(params),
        quantized_bytes=sum(quant_storage_bytes(module) for module in layers),
        original_bytes=original,
        label=",".join(dict.fromkeys(_layer_label(module) for module in layers)),
        original_dtype=",".join(dict.fromkeys(_DTYPE_NAMES.get(d, str(d)) for d in dtypes)),
    )


def _tied_linear_names(model: nn.Module) -> set[str]:
    owners: dict[int, set[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), set()).add(name)
    return {
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and len(owners.get(id(module.weight), ())) > 1
    }


def default_skip_names(model: nn.Module) -> set[str]:
    """Linear layers QLoRA keeps in full precision: output heads and weights tied to other modules.

    Heads are those of :func:`lightning_adapt.targeting.output_head_names` (Hugging Face's
    ``get_output_embeddings()``, weights tied to an embedding, and leaf names such as ``lm_head``,
    ``classifier``, ``score``). A Linear whose weight is also registered by another module is always
    skipped: quantizing it would silently untie it.
    """
    heads = output_head_names(model)
    linear = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    return (heads & linear) | _tied_linear_names(model)


def _adapter_param_ids(model: nn.Module) -> set[int]:
    ids: set[int] = set()
    for module in model.modules():
        adapter_params = getattr(module, "adapter_params", None)
        if callable(adapter_params):
            ids |= {id(p) for p in adapter_params()}
    return ids


def _candidate_names(model: nn.Module) -> list[str]:
    """Names of full-precision Linear layers that may be quantized (never LoRA adapters)."""
    bnb = require_bitsandbytes()
    excluded = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt, nn.modules.linear.NonDynamicallyQuantizableLinear)
    adapter_ids = _adapter_param_ids(model)
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and not isinstance(module, excluded)  # MultiheadAttention reads out_proj.weight directly
        and not _ADAPTER_COMPONENTS.intersection(name.split("."))
        and id(module.weight) not in adapter_ids
    ]


def _check_skip_entries(model: nn.Module, skip_modules: Sequence[str], candidates: list[str]) -> None:
    names = [name for name, _ in model.named_modules()]
    unknown = [entry for entry in skip_modules if not any(matches(name, entry) for name in names)]
    if unknown:
        more = f", ... ({len(candidates)} in all)" if len(candidates) > 40 else ""
        shown = ", ".join(candidates[:40]) + more
        raise ValueError(
            f"skip_modules={list(skip_modules)!r}: {unknown!r} match no module (whole dotted names, exact or "
            f"'.suffix'). Quantizable Linear layers: {shown or 'none'}. Fix: use one of these names."
        )


def _is_skipped(name: str, skip: set[str]) -> bool:
    parts = name.split(".")
    prefixes = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}  # a skipped parent skips its children
    return any(matches(prefix, entry) for prefix in prefixes for entry in skip)


def quantize_model(
    model: nn.Module,
    config: QuantConfig,
    skip_modules: Sequence[str] = (),
    include_default_skips: bool = True,
) -> QuantSummary:
    """Replace ``model``'s Linear layers by quantized ones, in place, one layer at a time.

    Each full-precision Linear is quantized and swapped in before the next is touched, so its fp
    weight is released right away (peak ≈ model + one layer). Skipped: ``skip_modules`` entries
    (a module's dotted name, exact or as ``.suffix``, also skipping everything inside it),
    :func:`default_skip_names` when ``include_default_skips``, LoRA adapters (``lora_A`` / ``lora_B``
    and anything an ``adapter_params()`` module reports). The ``base_layer`` of a LoRA wrapper is
    quantized. Already quantized layers are left alone, so calling this twice is a no-op.

    Returns:
        A summary over every quantized layer of ``model`` (including ones quantized earlier).

    Raises:
        ValueError: an entry of ``skip_modules`` matches no module (the message lists candidates).
    """
    candidates = _candidate_names(model)
    _check_skip_entries(model, skip_modules, candidates)
    skip = set(skip_modules) | (default_skip_names(model) if include_default_skips else set())
    for name in candidates:
        if _is_skipped(name, skip):
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, quantize_linear(getattr(parent, attr), config))  # old Linear dropped here
    return summarize(model)


def frozen_state_keys(model: nn.Module) -> set[str]:
    """State-dict keys of every quantized layer's weight and quant state.

    Found from ``state_dict(keep_vars=True)`` so wrapper prefixes (e.g. activation checkpointing's
    ``_checkpoint_wrapped_module.``) are the real ones: ``<p>weight``, ``<p>weight.absmax``,
    ``<p>weight.quant_map``, ``<p>weight.nested_*``, ``<p>weight.quant_state.bitsandbytes__nf4``;
    int8: ``<p>weight``, ``<p>SCB``, ``<p>weight_format``. Biases are not included.
    """
    weights = {id(module.weight) for _, module in quantized_layers(model)}
    state = model.state_dict(keep_vars=True)
    prefixes = [key[: -len("weight")] for key, val in state.items() if key.endswith("weight") and id(val) in weights]
    keys: set[str] = set()
    for prefix in prefixes:
        extra = {prefix + "SCB", prefix + "weight_format"}
        keys |= {key for key in state if key.startswith(prefix + "weight.") or key in extra}
        keys.add(prefix + "weight")
    return keys
