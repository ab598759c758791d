"""What a layer is: the linear-like layer kinds, their dense weights, quantized or not, and the adapter protocol.

The bottom of the package: it imports nothing else of ours but :mod:`lightning_adapt.errors`, so every other module may import it
(this is what keeps adapters, quantization and export free of import cycles). bitsandbytes is imported
only through :func:`require_bitsandbytes` and its layer kinds are looked up only once it is loaded:
importing it costs seconds, and a quantized layer cannot exist before it is.

* kinds: ``nn.Linear``, transformers' ``Conv1D`` (weight stored ``(in, out)``), bitsandbytes
  ``Linear4bit`` / ``Linear8bitLt`` (read-only: dequantized); :func:`base_weight` reads any of them;
* :class:`AdapterModule`: a module owning adapter parameters; :func:`adapter_param_ids` is the one
  answer to "which parameters are adapter parameters";
* :data:`DTYPES`: the one table of dtype names used in configs and reports.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from lightning_adapt.errors import SETTING, ConfigError, require

__all__ = [
    "CONV1D_LAYOUT",
    "DTYPES",
    "OUTPUT_HEAD_NAMES",
    "AdapterModule",
    "adapter_param_ids",
    "as_stored",
    "base_weight",
    "dequantize_weight",
    "dtype_name",
    "frozen_state_keys",
    "is_conv1d",
    "is_linear_like",
    "is_plain_linear",
    "is_quantized",
    "layer_dims",
    "layer_writer",
    "linear_like_types",
    "named_modules_outside_adapters",
    "output_head_names",
    "quant_storage_bytes",
    "quantized_layers",
    "require_bitsandbytes",
    "stored_shape",
    "to_dtype",
]

#: dtype names used in configs, CLI flags and reports.
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp64": torch.float64,
    "uint8": torch.uint8,
}


#: The other spellings users write (transformers', PEFT's and torch's): ``"bfloat16"``, ``"torch.float32"``, ...
DTYPE_ALIASES: dict[str, str] = {
    "float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16",
    "float64": "fp64", "double": "fp64",
}  # fmt: skip


def to_dtype(
    value: str | torch.dtype, setting: str, allowed: tuple[str, ...] = ("bf16", "fp16", "fp32")
) -> torch.dtype:
    """``value`` as a torch dtype: a ``torch.dtype`` or a name (``"bf16"``, ``"bfloat16"``, ``"torch.bfloat16"``).

    Raises:
        ConfigError: naming ``setting`` (the error's setting), the value and the ``allowed`` names.
    """
    name = dtype_name(value) if isinstance(value, torch.dtype) else str(value).strip().lower().removeprefix("torch.")
    name = DTYPE_ALIASES.get(name, name)
    if name not in allowed:
        spellings = ", ".join(f"{a!r}" for a in allowed)
        raise ConfigError(
            f"{SETTING}={value!r}: not an allowed dtype. Allowed: {spellings} (or their long names such as "
            f"'bfloat16', 'float32', or a torch.dtype). Fix: e.g. {SETTING}='{allowed[0]}'.",
            setting=setting,
        )
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """``"bf16"`` for ``torch.bfloat16`` etc.; ``str(dtype)`` for a dtype without a short name."""
    return next((name for name, value in DTYPES.items() if value == dtype), str(dtype))


def require_bitsandbytes() -> ModuleType:
    """Import and return ``bitsandbytes``; raise a :class:`MissingDependencyError` (an ``ImportError``) saying how."""
    return require(
        "bitsandbytes",
        "Quantization and 8-bit/paged optimizers need bitsandbytes. Fix: `pip install 'lightning-adapt[qlora]'` "
        "(or `pip install 'bitsandbytes>=0.48'`).",
    )


@runtime_checkable
class AdapterModule(Protocol):
    """A module that owns trainable adapter parameters. Callers find adapter weights through this
    protocol (``isinstance(m, AdapterModule)``), never by matching ``"lora_"`` in parameter names."""

    def adapter_params(self) -> list[nn.Parameter]: ...


# --------------------------------------------------------------------------- linear-like layer table


@dataclass(frozen=True)
class _LayerKind:
    """How to read (and, for float layers, write) the dense ``(out, in)`` weight of a layer type."""

    read: Callable[[nn.Module], torch.Tensor]
    write: Callable[[nn.Module, torch.Tensor], None] | None  # None: quantized, cannot merge in place


def _weight(layer: nn.Module) -> torch.Tensor:
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(layer).__name__} has no weight tensor.")
    return weight


def _read_linear(layer: nn.Module) -> torch.Tensor:
    return _weight(layer).float()


def _write(target: torch.Tensor, value: torch.Tensor) -> None:
    # `.data` keeps autograd out, but its writes skip the version counter, which caches of values derived
    # from the weight (DoRA's ‖W‖_row, adapters/dora.py) read to notice a change: bump it.
    target.data.copy_(value)
    if not target.is_inference():  # inference tensors have no version counter
        torch.autograd.graph.increment_version(target)


def _write_linear(layer: nn.Module, weight: torch.Tensor) -> None:
    _write(_weight(layer), weight)


def _read_conv1d(layer: nn.Module) -> torch.Tensor:
    return _weight(layer).float().T  # Conv1D stores its weight as (in, out)


def _write_conv1d(layer: nn.Module, weight: torch.Tensor) -> None:
    _write(_weight(layer), weight.T)


def _read_quantized(layer: nn.Module) -> torch.Tensor:
    weight: torch.Tensor = dequantize_weight(layer)
    return weight.float()


def _layer_kinds() -> dict[type, _LayerKind]:
    return _build_layer_kinds("bitsandbytes" in sys.modules)


@functools.cache
def _build_layer_kinds(with_bitsandbytes: bool) -> dict[type, _LayerKind]:
    """The dispatch table. Looked up along the MRO, so the bitsandbytes classes (subclasses of
    ``nn.Linear``) win over ``nn.Linear``. bitsandbytes entries appear only once it is imported:
    a quantized layer cannot exist before that, and importing it costs seconds."""
    kinds: dict[type, _LayerKind] = {nn.Linear: _LayerKind(_read_linear, _write_linear)}
    try:
        from transformers.pytorch_utils import Conv1D

        kinds[Conv1D] = _LayerKind(_read_conv1d, _write_conv1d)
    except ImportError:  # pragma: no cover - transformers is a dependency, but the math must not need it
        pass
    bnb = sys.modules.get("bitsandbytes")
    if with_bitsandbytes and bnb is not None:
        for cls_name in ("Linear4bit", "Linear8bitLt"):
            cls = getattr(bnb.nn, cls_name, None)
            if isinstance(cls, type):
                kinds[cls] = _LayerKind(_read_quantized, None)
    return kinds


def _kind(layer: nn.Module) -> _LayerKind | None:
    kinds = _layer_kinds()
    return next((kinds[cls] for cls in type(layer).__mro__ if cls in kinds), None)


def is_plain_linear(module: nn.Module) -> bool:
    """Whether ``module`` is exactly an ``nn.Linear`` without forward hooks, so that reading its ``weight`` directly
    equals calling it (not so for an FSDP1 unit wrapping it, or a hook that gathers a sharded weight)."""
    return type(module) is nn.Linear and not (module._forward_pre_hooks or module._forward_hooks)


def is_linear_like(module: nn.Module) -> bool:
    """True for ``nn.Linear``, ``transformers`` ``Conv1D``, bitsandbytes ``Linear4bit`` / ``Linear8bitLt``."""
    return _kind(module) is not None


CONV1D_LAYOUT = "conv1d_layout"  #: marks a quantized layer made from a ``Conv1D`` (its checkpoints store (in, out))


def is_conv1d(layer: nn.Module) -> bool:
    """Whether ``layer``'s checkpoints store its weight ``(in, out)``: a GPT-2 style ``transformers`` ``Conv1D``, or a
    quantized layer made from one (which computes as a Linear on ``Wᵀ``)."""
    cls = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)  # never imported: no Conv1D exists
    return getattr(layer, CONV1D_LAYOUT, False) is True or (isinstance(cls, type) and isinstance(layer, cls))


def as_stored(layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """``layer``'s dense ``(out, in)`` weight as its checkpoints store it, or back: transposed if :func:`is_conv1d`."""
    return weight.T if is_conv1d(layer) else weight


def stored_shape(layer: nn.Module) -> tuple[int, int]:
    """The shape of ``layer``'s weight in its checkpoints, without dequantizing."""
    return layer_dims(layer) if is_conv1d(layer) else layer_dims(layer)[::-1]


def layer_writer(layer: nn.Module) -> Callable[[nn.Module, torch.Tensor], None] | None:
    """How to overwrite ``layer``'s dense ``(out, in)`` weight in place; ``None`` for quantized or unknown layers."""
    kind = _kind(layer)
    return None if kind is None else kind.write


def linear_like_types() -> tuple[type, ...]:
    """The layer types LoRA can wrap (bitsandbytes ones only once ``bitsandbytes`` is imported)."""
    return tuple(_layer_kinds())


def base_weight(layer: nn.Module) -> torch.Tensor:
    """Dense ``(out, in)`` fp32 weight of a linear-like layer; quantized weights are dequantized.

    Raises:
        TypeError: ``layer`` is not linear-like.
    """
    kind = _kind(layer)
    if kind is None:
        raise TypeError(
            f"base_weight: {type(layer).__name__} is not linear-like; expected one of "
            f"{[t.__name__ for t in linear_like_types()]}."
        )
    return kind.read(layer)


def layer_dims(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) without dequantizing."""
    in_features, out_features = getattr(layer, "in_features", None), getattr(layer, "out_features", None)
    if isinstance(in_features, int) and isinstance(out_features, int):
        return in_features, out_features
    nx, nf = _weight(layer).shape  # Conv1D: weight (in, out); a 4-bit weight is packed, hence in_features
    return int(nx), int(nf)


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes Linear4bit / Linear8bitLt holding quantized weights."""
    bnb = sys.modules.get("bitsandbytes")  # never imported → no module can be a bnb layer
    if bnb is None:
        return False
    if isinstance(module, bnb.nn.Linear4bit):  # a shardable one (shard4bit) keeps its state on the layer
        return bool(getattr(module.weight, "bnb_quantized", False)) or _shard_state(module) is not None
    if isinstance(module, bnb.nn.Linear8bitLt):
        return bool(module.weight.dtype == torch.int8)
    return False


def _int8_scales(module: Any) -> torch.Tensor:
    # Before the first forward the scales live on the weight, afterwards on the matmul state.
    scales = getattr(module.weight, "SCB", None)
    return module.state.SCB if scales is None else scales  # type: ignore[no-any-return]


def _shard_state(module: nn.Module) -> Any:
    return getattr(module, "shard_quant_state", None)  # lightning_adapt.shard4bit.SHARD_STATE_ATTR


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (possibly FSDP2-sharded) tensor."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor.data


def dequantize_weight(module: nn.Module) -> torch.Tensor:
    """Dense fp32 ``(out, in)`` weight of a quantized layer, as bitsandbytes dequantizes it.

    A plain ``nn.Linear`` returns its weight in fp32 (detached copy semantics not guaranteed). An FSDP2-sharded
    4-bit weight is gathered first (a collective: call it on every rank).
    """
    if not is_quantized(module):
        if isinstance(module, nn.Linear):
            return module.weight.detach().float()
        raise TypeError(f"dequantize_weight expects a quantized or plain Linear, got {type(module).__name__}")
    bnb = require_bitsandbytes()
    weight: Any = module.weight
    if isinstance(module, bnb.nn.Linear4bit):
        state = _shard_state(module) or weight.quant_state
        weight = weight.full_tensor() if isinstance(weight, DTensor) else weight
        if getattr(state, "packing_format_for_cpu", False):
            raise RuntimeError(
                "This Linear4bit was repacked by bitsandbytes' CPU AVX512-BF16 path; its codes no longer "
                "dequantize correctly. Use lightning_adapt.quantize.quantize_linear (it disables that)."
            )
        return bnb.functional.dequantize_4bit(weight.data, state).float()  # type: ignore[no-any-return]
    return bnb.functional.int8_vectorwise_dequant(weight.data, _int8_scales(module)).float()  # type: ignore[no-any-return]


def _state_tensors(module: Any) -> Iterator[torch.Tensor]:
    bnb = require_bitsandbytes()
    yield _local(module.weight)
    if isinstance(module, bnb.nn.Linear4bit):
        state = _shard_state(module) or module.weight.quant_state
        yield from (state.absmax, state.code)
        if state.nested:
            yield from (state.offset, state.state2.absmax, state.state2.code)
    else:
        yield _int8_scales(module)


def quant_storage_bytes(module: nn.Module) -> int:
    """Bytes of a quantized layer's weight: packed codes + quant state (absmax, nested absmax, code
    tables, offset; int8: row scales). Counted as serialized, per layer; the codes of an FSDP2-sharded layer
    count this rank's shard. 0 for other modules."""
    if not is_quantized(module):
        return 0
    return sum(t.numel() * t.element_size() for t in _state_tensors(module))


def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(dotted name, layer)`` for every quantized layer in ``model``, in module order."""
    return [(name, module) for name, module in model.named_modules() if is_quantized(module)]


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


OUTPUT_HEAD_NAMES: frozenset[str] = frozenset(
    {"lm_head", "embed_out", "classifier", "score", "qa_outputs", "cls", "head", "output_layer", "output_projection"}
)
"""Leaf names treated as output heads (task heads, LM heads, BERT's MLM ``cls``): their
subtree is excluded from ``"all-linear"``, since adapting a fresh head as low-rank is a mistake."""


def named_modules_outside_adapters(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``named_modules`` without the root and without the insides of existing adapters, so that
    targeting an already adapted model never selects ``base_layer`` / ``lora_A`` / ``lora_B``."""
    out: list[tuple[str, nn.Module]] = []
    inside: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in inside):
            continue
        out.append((name, module))
        if isinstance(module, AdapterModule):
            inside.append(name)
    return out


def output_head_names(model: nn.Module) -> set[str]:
    """Dotted names of the output heads of ``model`` (and of every module inside one).

    A head is: the module returned by a Hugging Face ``get_output_embeddings()``; a module whose
    ``weight`` is the very tensor of an ``nn.Embedding`` (tied embeddings); or a module whose leaf name
    is in :data:`OUTPUT_HEAD_NAMES`.
    """
    modules = named_modules_outside_adapters(model)
    heads: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    embedding_weights = {id(m.weight) for _, m in modules if isinstance(m, nn.Embedding)}
    for name, module in modules:
        weight = getattr(module, "weight", None)
        tied = not isinstance(module, nn.Embedding) and id(weight) in embedding_weights
        if module is out_emb or tied or name.rsplit(".", 1)[-1] in OUTPUT_HEAD_NAMES:
            heads.add(name)
    return {n for n, _ in modules if any(n == h or n.startswith(h + ".") for h in heads)}


def adapter_param_ids(model: nn.Module) -> set[int]:
    """``id()`` of every adapter parameter in ``model``: those reported by :class:`AdapterModule` modules."""
    return {id(p) for module in model.modules() if isinstance(module, AdapterModule) for p in module.adapter_params()}
