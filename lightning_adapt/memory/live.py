"""Describe a live run to the estimator: its model shape, method, rank, targets, quantization and optimizer.

Read off the module and the settings of its transforms (no Lightning): the ``config`` of the first
Hugging Face ``PreTrainedModel`` inside the module (its class standing for ``architectures``, which picks
the head), the method from the specs present (a :class:`QuantPlan` → qlora, a :class:`LoRASpec` → lora,
else full), base and adapter dtypes from the parameters, the optimizer kind from its class. A module the
estimator cannot describe exactly gets ``(None, reason)``.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast, get_args

import torch
from torch import nn

from lightning_adapt.adapters.inject import LoRASpec, logical_numel
from lightning_adapt.adapters.targeting import ALL_LINEAR, DEFAULT_TARGETS
from lightning_adapt.layers import adapter_param_ids, dtype_name, layer_dims, quantized_layers
from lightning_adapt.memory.estimator import (
    Assumptions,
    Dtype,
    Estimate,
    Method,
    ModelShape,
    Optimizer,
    Quant,
    estimate,
    linear_shapes,
)
from lightning_adapt.quantize import QuantPlan

__all__ = ["Run", "describe_run", "predict"]

_T = TypeVar("_T")


def _hf_model(module: nn.Module) -> Any:
    transformers = sys.modules.get("transformers")  # never imported: no module can be a HF model
    if transformers is None:
        return None
    return next((m for m in module.modules() if isinstance(m, transformers.PreTrainedModel)), None)


@dataclass(frozen=True)
class Run:
    """A live run as the estimator sees it: the shape, the method, the assumptions and their estimate."""

    shape: ModelShape
    method: Method
    assumptions: Assumptions
    estimate: Estimate


def describe_run(
    module: nn.Module,
    specs: Sequence[object],
    optimizer: torch.optim.Optimizer | None,
    tokens: tuple[int, int] | None = None,
    settings: Mapping[str, Any] | None = None,
    planned: bool = False,
) -> tuple[Run | None, str | None]:
    """The estimator's description of a live run, or ``(None, why not)``.

    Args:
        module: the trained module (it holds the Hugging Face model whose config is the shape; its parameters may
            be on the meta device: only their shapes and dtypes are read).
        specs: the settings of the run's model transforms (a :class:`LoRASpec`, a :class:`QuantPlan`).
        optimizer: the run's optimizer, if built (its class gives the optimizer kind).
        tokens: ``(batch size, sequence length)`` of a training batch, for the activation term.
        settings: further :class:`~lightning_adapt.memory.Assumptions` fields the caller knows, applied last:
            ``world_size``, ``strategy`` (``ddp`` / ``fsdp``) and ``shard_quantized`` (the estimate is then per
            rank), a ``base_dtype`` the precision plugin will cast the weights to, an ``optimizer`` kind.
        planned: the run is not built yet (``module`` is what ``configure_model`` builds, before the transforms;
            ``optimizer`` was built over its parameters): the optimizer's moments are taken in the dtypes the run
            will train, fp32 adapters and the base dtype for full fine-tuning and ``modules_to_save``.
    """
    model = _hf_model(module)
    if model is None:
        why = "holds no Hugging Face PreTrainedModel, so there is no config to estimate from"
        return None, f"{type(module).__name__} {why}"
    try:
        name = type(model).__name__  # the live class, not the checkpoint's (a BertModel loaded with a new head)
        shape = ModelShape.from_config({**model.config.to_dict(), "architectures": [name]}, name=name)
        _check_accounted(module, model, shape)
        method, options = _method_options(specs, model, shape)
        options["activation_checkpointing"] = _checkpointing(model)
        if tokens is not None:
            options["batch_size"], options["seq_len"] = tokens
        options.update(settings or {})
        trained = _planned_dtypes(method, options) if planned else None
        options.update(_optimizer_options(optimizer, trained) | dict(settings or {}))
        assumptions = Assumptions(**options)
        return Run(shape, method, assumptions, estimate(shape, method, assumptions)), None
    except ValueError as err:
        return None, f"the estimator cannot describe this run: {err}"


def predict(
    module: nn.Module,
    specs: Sequence[object],
    optimizer: torch.optim.Optimizer | None,
    tokens: tuple[int, int] | None = None,
    settings: Mapping[str, Any] | None = None,
) -> tuple[Estimate | None, str | None]:
    """The estimator's prediction for a live run, or ``(None, why not)``; the arguments of :func:`describe_run`."""
    run, why = describe_run(module, specs, optimizer, tokens, settings)
    return (run.estimate if run is not None else None), why


def _checkpointing(model: Any) -> bool:
    """Whether the Hugging Face model recomputes its blocks' activations (transformers 5 renamed the flag)."""
    name = (
        "is_activation_checkpointing"
        if hasattr(type(model), "is_activation_checkpointing")
        else "is_gradient_checkpointing"
    )
    return bool(getattr(model, name, False))


def _check_accounted(module: nn.Module, model: nn.Module, shape: ModelShape) -> None:
    """Raise unless ``shape`` counts every non-adapter parameter of ``module`` (a packed 4-bit tensor as
    the weights it holds, also once FSDP2 made it a plain one; a sharded tensor with its global size): the
    estimate would silently leave the rest out."""
    inside, adapters = {id(p) for p in model.parameters()}, adapter_param_ids(module)
    outside = [n for n, p in module.named_parameters() if id(p) not in inside and id(p) not in adapters]
    if outside:
        more = f" and {len(outside) - 3} more" if len(outside) > 3 else ""
        raise ValueError(f"parameters outside {type(model).__name__} are not modeled: {', '.join(outside[:3])}{more}")
    packed = {id(layer.weight): math.prod(layer_dims(layer)) for _, layer in quantized_layers(model)}
    numel = sum(packed.get(id(p)) or logical_numel(p) for p in model.parameters() if id(p) not in adapters)
    if numel != shape.total_params:
        raise ValueError(
            f"{type(model).__name__} holds {numel:,} parameters besides adapters; its config describes "
            f"{shape.total_params:,} (a head or layer the estimator does not model)"
        )


def _spec(specs: Sequence[object], cls: type[_T]) -> _T | None:
    return next((spec for spec in specs if isinstance(spec, cls)), None)


def _weights_dtype(model: nn.Module, adapters: bool) -> Dtype:
    """The dtype holding most bytes among adapter (or non-adapter, non-quantized) parameters."""
    ids = adapter_param_ids(model)
    totals: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if (id(p) in ids) == adapters and p.dtype.is_floating_point:
            totals[p.dtype] = totals.get(p.dtype, 0) + p.numel() * p.element_size()
    dtype = max(totals, key=lambda d: totals[d]) if totals else torch.float32
    name = dtype_name(dtype)
    if name not in get_args(Dtype):
        raise ValueError(f"parameters in {dtype} are not modeled (bf16, fp16 or fp32 only)")
    return cast(Dtype, name)


def _method_options(specs: Sequence[object], model: nn.Module, shape: ModelShape) -> tuple[Method, dict[str, Any]]:
    lora, quant = _spec(specs, LoRASpec), _spec(specs, QuantPlan)
    options: dict[str, Any] = {"base_dtype": _weights_dtype(model, adapters=False)}
    if lora is None:
        if quant is not None:
            raise ValueError("a quantized base without LoRA adapters has nothing to train")
        return "full", options
    options.update(rank=lora.r, targets=_targets(lora, shape), adapter_dtype=_weights_dtype(model, adapters=True))
    options["modules_to_save"] = _saved(lora.modules_to_save, shape)
    if quant is None:
        return "lora", options
    options.update(_quant_options(quant, lora.modules_to_save))
    return "qlora", options


def _targets(spec: LoRASpec, shape: ModelShape) -> tuple[str, ...]:
    """The estimator's targets for the LoRA spec: ``all-linear``, the default names the shape has, or each
    entry as the longest dotted suffix naming linears of the shape (matched by suffix, as targeting does)."""
    names = list(linear_shapes(shape))
    if spec.exclude_modules:
        raise ValueError(f"exclude_modules={list(spec.exclude_modules)} has no estimator equivalent")
    if spec.target_parameters:  # the estimator's shapes hold linears only, not fused expert parameters
        raise ValueError(f"target_parameters={list(spec.target_parameters)} has no estimator equivalent")
    if spec.target_modules == ALL_LINEAR:
        return (ALL_LINEAR,)
    if spec.target_modules is None:
        return tuple(entry for entry in DEFAULT_TARGETS if _known(entry, names, "target_modules") == entry)
    entries = (spec.target_modules,) if isinstance(spec.target_modules, str) else tuple(spec.target_modules)
    known = [_known(entry, names, "target_modules") for entry in entries]
    if missing := [entry for entry, name in zip(entries, known, strict=True) if name is None]:
        raise ValueError(f"target_modules entries {missing} name no linear of the config ({', '.join(names)})")
    return tuple(name for name in known if name is not None)


def _saved(modules: Sequence[str], shape: ModelShape) -> tuple[str, ...]:
    """Each entry as the longest dotted suffix the shape knows (``bert.pooler.dense`` → ``pooler.dense``,
    ``model.norm`` → ``norm``); a tied ``lm_head`` is ``embed_tokens``; unknown names are left for
    :func:`~lightning_adapt.memory.resolve_saved` to reject with the allowed ones."""
    names = [*linear_shapes(shape), *(n for n, _, _ in shape.others)]
    known = [_known(entry, names, "modules_to_save") or entry for entry in modules]
    # a tied head is the embedding: training ``lm_head`` trains ``embed_tokens``
    return tuple("embed_tokens" if name == "lm_head" and name not in names else name for name in known)


def _known(entry: str, names: Sequence[str], setting: str) -> str | None:
    """The longest dotted suffix of ``entry`` that is, or ends, one of ``names``; ``None`` if none does."""
    parts = entry.split(".")
    if not re.fullmatch(r"[\w.]+", entry) or any(part.isdigit() for part in parts):
        raise ValueError(f"{setting} entry {entry!r} is a regex or selects single layers; the estimator needs names")
    suffixes = (".".join(parts[i:]) for i in range(len(parts)))
    return next((x for x in suffixes if any(n == x or n.endswith("." + x) for n in names)), None)


def _quant_options(quant: QuantPlan, saved: Sequence[str]) -> dict[str, Any]:
    # the estimator quantizes every linear but task heads and ``modules_to_save`` (which must be skipped)
    if not quant.include_default_skips:
        raise ValueError("include_default_skips=False quantizes output heads; the estimator keeps them unquantized")
    if extra := [entry for entry in quant.skip_modules if entry not in saved]:
        raise ValueError(f"skip_modules={extra!r} outside modules_to_save have no estimator equivalent")
    config = quant.config
    # fp4 is stored exactly like nf4 (codes, absmax, tables)
    kind: Quant = "int8" if config.mode == "int8" else "nf4-dq" if config.double_quant else "nf4"
    compute = dtype_name(config.compute_dtype) if config.compute_dtype is not None else "bf16"
    return {"quant": kind, "quant_blocksize": config.blocksize, "quant_compute_dtype": compute}


_TORCH_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _planned_dtypes(method: Method, options: Mapping[str, Any]) -> set[torch.dtype]:
    """The dtypes of what a run not yet transformed will train: adapters (fp32, ``LoRALinear`` keeps them so), the
    base for full fine-tuning, ``modules_to_save`` in the base dtype."""
    dtypes = {torch.float32} if method != "full" else set()
    if method == "full" or options.get("modules_to_save"):
        dtypes.add(_TORCH_DTYPES[options["base_dtype"]])
    return dtypes


def _optimizer_options(optimizer: torch.optim.Optimizer | None, trained: set[torch.dtype] | None) -> dict[str, Any]:
    """AdamW kind and per-tensor scalars from the optimizer's class (torch keeps moments in the param dtype: those of
    ``trained``, else of the optimizer's trainable parameters)."""
    if optimizer is None:
        return {}
    cls = type(optimizer)
    if cls.__module__.startswith("bitsandbytes"):
        if "Adam" not in cls.__name__:
            raise ValueError(f"optimizer {cls.__name__} is not modeled (AdamW only)")
        kind: Optimizer = "adamw-8bit" if "8bit" in cls.__name__ else "adamw-fp32"
        return {"optimizer": kind}
    if not issubclass(cls, (torch.optim.Adam, torch.optim.AdamW)):
        raise ValueError(f"optimizer {cls.__name__} is not modeled (AdamW only)")
    dtypes = (
        trained
        if trained is not None
        else {p.dtype for g in optimizer.param_groups for p in g["params"] if p.requires_grad}
    )
    kind = "adamw-fp32" if dtypes <= {torch.float32} else "adamw-16bit"
    return {"optimizer": kind, "state_bytes_per_tensor": 4}  # an fp32 `step` tensor per parameter
