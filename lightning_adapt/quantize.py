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

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, get_args

import torch
from torch import nn

from lightning_adapt.errors import ConfigError
from lightning_adapt.layers import (
    CONV1D_LAYOUT,
    adapter_param_ids,
    dequantize_weight,
    dtype_name,
    is_conv1d,
    output_head_names,
    quant_storage_bytes,
    quantized_layers,
    require_bitsandbytes,
)
from lightning_adapt.naming import check_entries, under

QuantMode = Literal["nf4", "fp4", "int8"]

_MODES: tuple[str, ...] = get_args(QuantMode)
_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes' quantize_4bit check
_COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_STORAGE_DTYPES = (torch.uint8, torch.int8, torch.bfloat16, torch.float16, torch.float32)


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
            or float32. ``None`` (default): :func:`default_compute_dtype` of each weight — bf16 on CUDA,
            the weight's own dtype elsewhere (fp32 on a CPU without bf16 matmul units stays fast).
        quant_storage: 4-bit only: dtype of the tensor holding packed codes (non-uint8 is for FSDP).
    """

    mode: QuantMode = "nf4"
    double_quant: bool = True
    blocksize: int = 64
    compute_dtype: torch.dtype | None = None
    quant_storage: torch.dtype = torch.uint8

    def __post_init__(self) -> None:
        problems = _config_problems(self)
        if problems:
            raise ConfigError("Invalid QuantConfig:\n  - " + "\n  - ".join(problems))

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
            cfg.compute_dtype is not None and cfg.compute_dtype not in _COMPUTE_DTYPES,
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


def default_compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The compute dtype a 4-bit layer gets when none is configured: bf16 on CUDA (QLoRA's setting), else the
    weight's own float dtype (fp32 for other dtypes). It follows the run's precision, since the weights were
    loaded (or cast by a ``*-true`` precision) in it; a CPU without bf16 matmul units keeps fp32 speed."""
    if weight.device.type == "cuda":
        return torch.bfloat16
    return weight.dtype if weight.dtype in _COMPUTE_DTYPES else torch.float32


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
    if config.compute_dtype is None:
        config = replace(config, compute_dtype=default_compute_dtype(linear.weight))
    conv1d = is_conv1d(linear)
    source = _linear_of_conv1d(linear) if conv1d else linear
    layer: nn.Module = _QUANTIZERS[config.mode](source, config, require_bitsandbytes())
    if conv1d:
        setattr(layer, CONV1D_LAYOUT, True)  # the export writes it back (in, out), as its checkpoints store it
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().to(config.compute_dtype), requires_grad=False)
    if hasattr(layer, "support_avx512bf16_for_cpu"):
        layer.support_avx512bf16_for_cpu = False  # type: ignore[assignment]
    layer.original_dtype = linear.weight.dtype  # type: ignore[assignment]
    layer.train(linear.training)
    return layer.requires_grad_(False)


def _linear_of_conv1d(conv1d: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` a ``transformers`` ``Conv1D`` computes (``y = x W + b`` with ``W`` stored ``(in, out)``):
    weight ``Wᵀ``, the same bias. Costs one layer's copy."""
    weight: torch.Tensor = conv1d.weight  # type: ignore[assignment]
    in_features, out_features = weight.shape
    bias = conv1d.bias
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.detach().T.contiguous(), requires_grad=False)
    if isinstance(bias, torch.Tensor):
        linear.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return linear


def quantization_roundtrip(config: QuantConfig, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """``W -> deq(quant(W))``, fp32: the weight a layer quantized by :func:`quantize_linear` from ``W`` cast to
    ``dtype`` computes with (the same codes, state and compute dtype), for LoftQ's fit to the quantization error."""

    def roundtrip(weight: torch.Tensor) -> torch.Tensor:
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        linear.weight = nn.Parameter(weight.detach().to(dtype), requires_grad=False)
        return dequantize_weight(quantize_linear(linear, config)).float()

    return roundtrip


def _layer_label(module: Any) -> str:
    weight = module.weight
    if hasattr(weight, "quant_type"):
        return str(weight.quant_type) + ("+dq" if weight.compress_statistics else "")
    return "int8"


def _original_dtype(module: Any) -> torch.dtype:
    # set by quantize_linear; for layers quantized elsewhere: the dtype bnb quantized from
    fallback = getattr(getattr(module.weight, "quant_state", None), "dtype", torch.float16)
    return getattr(module, "original_dtype", fallback)  # type: ignore[no-any-return]


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
        original_dtype=",".join(dict.fromkeys(dtype_name(d) for d in dtypes)),
    )


def _tied_linear_names(model: nn.Module) -> set[str]:
    owners: dict[int, set[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), set()).add(name)
    return {
        name
        for name, module in model.named_modules()
        if _dense_linear(module) and len(owners.get(id(module.weight), ())) > 1
    }


def default_skip_names(model: nn.Module) -> set[str]:
    """Linear layers QLoRA keeps in full precision: output heads and weights tied to other modules.

    Heads are those of :func:`lightning_adapt.layers.output_head_names` (Hugging Face's
    ``get_output_embeddings()``, weights tied to an embedding, and leaf names such as ``lm_head``,
    ``classifier``, ``score``). A Linear whose weight is also registered by another module is always
    skipped: quantizing it would silently untie it. So are the layers a Hugging Face model asks to keep in fp32
    (``_keep_in_fp32_modules``: T5's ``wo``, whose forward casts its input to that weight's dtype).
    """
    heads = output_head_names(model)
    linear = {name for name, module in model.named_modules() if _dense_linear(module)}
    return (heads & linear) | _tied_linear_names(model) | (_keep_in_fp32(model) & linear)


def _keep_in_fp32(model: nn.Module) -> set[str]:
    """Modules under a Hugging Face model's ``_keep_in_fp32_modules`` (leaf-name or dotted-suffix entries)."""
    found: set[str] = set()
    for prefix, module in model.named_modules():
        entries = list(getattr(module, "_keep_in_fp32_modules", None) or [])
        entries += list(getattr(module, "_keep_in_fp32_modules_strict", None) or [])
        if entries:
            dotted = prefix + "." if prefix else ""
            names = [dotted + n for n, _ in module.named_modules() if n]
            found |= {name for name in names if under(name[len(dotted) :], entries)}
    return found


def _dense_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` (bitsandbytes' layers are subclasses) or a ``transformers`` ``Conv1D`` (GPT-2)."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def candidate_names(model: nn.Module) -> list[str]:
    """Names of full-precision Linear (and ``Conv1D``) layers that may be quantized (never LoRA adapters)."""
    bnb = require_bitsandbytes()
    excluded = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt, nn.modules.linear.NonDynamicallyQuantizableLinear)
    adapter_ids = adapter_param_ids(model)
    return [
        name
        for name, module in model.named_modules()
        if _dense_linear(module)
        and not isinstance(module, excluded)  # MultiheadAttention reads out_proj.weight directly
        and id(module.weight) not in adapter_ids
    ]


@dataclass(frozen=True)
class QuantPlan:
    """Which Linear layers of a model to quantize, and how: the settings of :func:`quantize_model`.

    Args:
        config: the storage format.
        skip_modules: modules kept in full precision (naming rules of :mod:`lightning_adapt.naming`;
            a skipped module keeps everything inside it).
        include_default_skips: also keep :func:`default_skip_names` (output heads, tied weights).
        keep: modules that train in full precision (LoRA's ``modules_to_save``): never quantized. Unlike
            ``skip_modules``, an entry matching nothing is not an error here (the LoRA settings check it).
    """

    config: QuantConfig = QuantConfig()
    skip_modules: tuple[str, ...] = ()
    include_default_skips: bool = True
    keep: tuple[str, ...] = ()

    def selected(self, model: nn.Module) -> list[str]:
        """Names of the Linear layers of ``model`` this plan quantizes (an unknown skip entry is an error)."""
        candidates = candidate_names(model)
        names = [name for name, _ in model.named_modules()]
        check_entries(list(self.skip_modules), names, "skip_modules", candidates)
        skip = set(self.skip_modules) | (default_skip_names(model) if self.include_default_skips else set())
        return [name for name in candidates if not under(name, skip) and not under(name, self.keep)]

    def kept(self, model: nn.Module) -> list[str]:
        """The Linear layers ``keep`` holds back from quantization (they train in full precision)."""
        return [name for name in candidate_names(model) if under(name, self.keep)]


def quantize_model(
    model: nn.Module,
    config: QuantConfig,
    skip_modules: Sequence[str] = (),
    include_default_skips: bool = True,
    keep: Sequence[str] = (),
) -> QuantSummary:
    """Replace ``model``'s Linear layers by quantized ones, in place, one layer at a time.

    Each full-precision Linear is quantized and swapped in before the next is touched, so its fp
    weight is released right away (peak ≈ model + one layer). Skipped: ``skip_modules`` entries
    (a module's dotted name, exact or as ``.suffix``, also skipping everything inside it),
    :func:`default_skip_names` when ``include_default_skips``, LoRA adapters (``lora_A`` / ``lora_B``
    and anything an ``adapter_params()`` module reports). The ``base_layer`` of a LoRA wrapper is
    quantized; ``keep`` (LoRA's ``modules_to_save``) is never quantized. Already quantized layers are left
    alone, so calling this twice is a no-op.

    Returns:
        A summary over every quantized layer of ``model`` (including ones quantized earlier).

    Raises:
        ValueError: an entry of ``skip_modules`` matches no module (the message lists candidates).
    """
    plan = QuantPlan(config, tuple(skip_modules), include_default_skips, tuple(keep))
    for name in plan.selected(model):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, quantize_linear(getattr(parent, attr), config))  # old Linear dropped here
    return summarize(model)
