"""``MemoryReportCallback``: measured training memory side by side with the estimator's prediction."""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_adapt.callbacks.lora import LoRAInjectionCallback
from lightning_adapt.callbacks.quantize import QuantizeBaseCallback
from lightning_adapt.inject import logical_numel
from lightning_adapt.lora import AdapterModule
from lightning_adapt.memory import (
    Assumptions,
    Dtype,
    Estimate,
    Method,
    ModelShape,
    Optimizer,
    Quant,
    estimate,
    format_bytes,
    format_params,
    linear_shapes,
)
from lightning_adapt.optim import optimizer_state_bytes
from lightning_adapt.quant import quant_storage_bytes, quantized_layers
from lightning_adapt.targeting import ALL_LINEAR, DEFAULT_TARGETS

_DTYPES: dict[torch.dtype, Dtype] = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_STAGES = {
    "fit_start": "at fit start (no gradients or optimizer state before the first step)",
    "first_step": "after the first optimizer step",
    "fit_end": "at fit end",
}
#: stage -> component -> (measured, estimated); ``None`` where a figure does not exist (yet).
_Report = dict[str, tuple[int | None, int | None]]


class MemoryReportCallback(L.Callback):
    """Measure weights, trainable parameters, gradients, optimizer state and peak memory; compare each with
    :func:`lightning_adapt.memory.estimate` for the same run.

    Reports at fit start, after the first optimizer step (optimizer state is created lazily there) and at
    fit end: one table ``component | measured | estimated | ratio`` (``ratio = measured / estimated``) on
    rank zero, and the numbers through the trainer's loggers (``<prefix>/<stage>/<component>_measured``
    and ``..._estimated``) when there are any. Gradients are measured right before each optimizer step.

    The estimator's input is read off the live run: the ``config`` of the first Hugging Face
    ``PreTrainedModel`` inside the module (its class standing for ``architectures``, which picks the head:
    a ``BertForSequenceClassification`` adds the ``classifier``), the method from the callbacks present
    (:class:`~lightning_adapt.callbacks.quantize.QuantizeBaseCallback` → qlora,
    :class:`~lightning_adapt.callbacks.lora.LoRAInjectionCallback` → lora, else full), rank, targets and
    ``modules_to_save`` from the LoRA callback, the quantization format from the quantize callback, base and
    adapter dtypes from the parameters, the optimizer kind from the optimizer's class. A module without a
    Hugging Face config, or whose parameters the config does not account for exactly (a head outside the
    Hugging Face model, an unmodeled architecture), gets measured figures only, with the reason.

    Measured peak is ``torch.cuda.max_memory_allocated`` on GPU and the process's peak resident set size
    on CPU (Python, libraries and data included, so it exceeds any estimate there).

    Example::

        Trainer(callbacks=[LoRAInjectionCallback(r=16), MemoryReportCallback()])

    Attributes:
        reports: ``{stage: {component: (measured, estimated)}}`` for the stages reported so far
            (``fit_start``, ``first_step``, ``fit_end``); bytes, except ``trainable params`` (a count).
        estimate: The estimator's prediction for the run, or ``None`` (see ``no_estimate_reason``).
    """

    def __init__(self, log_metrics: bool = True, activations: bool = True, prefix: str = "memory") -> None:
        """
        Args:
            log_metrics: also send the numbers to the trainer's loggers (if any), not only print them.
            activations: add the estimator's activation term to the estimated peak, from the first training
                batch's ``input_ids`` shape (batch size, sequence length); a stated 16-bit approximation.
            prefix: first component of the logged metric names.
        """
        super().__init__()
        if not isinstance(prefix, str) or not prefix.strip("/"):
            raise ValueError(f"prefix={prefix!r} must be a non-empty string, e.g. prefix='memory'.")
        self.log_metrics = log_metrics
        self.activations = activations
        self.prefix = prefix.strip("/")
        self.reports: dict[str, _Report] = {}
        self.estimate: Estimate | None = None
        self.no_estimate_reason: str | None = None
        self._grad_bytes: int | None = None
        self._tokens: tuple[int, int] | None = None

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.reports, self._grad_bytes, self._tokens = {}, None, None
        self._report("fit_start", trainer, pl_module)

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
        if self._tokens is None and isinstance(ids, torch.Tensor) and ids.ndim == 2:
            self._tokens = (int(ids.shape[0]), int(ids.shape[1]))

    @override
    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # here, not at fit end: gradients are complete (accumulation done) and not yet zeroed
        self._grad_bytes = sum(_nbytes(p.grad) for p in pl_module.parameters() if p.grad is not None)

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if "first_step" not in self.reports and trainer.global_step >= 1:
            self._report("first_step", trainer, pl_module)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report("fit_end", trainer, pl_module)

    def _report(self, stage: str, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        self.estimate, self.no_estimate_reason = _predict(trainer, pl_module, optimizer, self._tokens)
        predicted = _predicted(self.estimate, optimizer is not None) if self.estimate else {}
        self.reports[stage] = report = _pair(_measure(pl_module, optimizer, self._grad_bytes), predicted)
        rank_zero_info(_format(stage, report, self.estimate, self.no_estimate_reason, _peak(pl_module)[1]))
        if self.log_metrics and trainer.loggers and trainer.is_global_zero:
            metrics = {
                f"{self.prefix}/{stage}/{component.replace(' ', '_')}_{kind}": float(value)
                for component, values in report.items()
                for kind, value in zip(("measured", "estimated"), values, strict=True)
                if value is not None
            }
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)


# --------------------------------------------------------------------------- measuring


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _adapter_ids(module: nn.Module) -> set[int]:
    return {id(p) for m in module.modules() if isinstance(m, AdapterModule) for p in m.adapter_params()}


def _measure(module: nn.Module, optimizer: torch.optim.Optimizer | None, grads: int | None) -> dict[str, int | None]:
    """Measured bytes: weights (per dtype; a quantized layer as codes + quant state), adapter weights,
    the trainable count, gradients, optimizer state and peak memory."""
    layers = [layer for _, layer in quantized_layers(module)]
    packed, adapters = {id(layer.weight) for layer in layers}, _adapter_ids(module)
    by_dtype: dict[str, int] = {}
    adapter = 0
    for param in module.parameters():  # a tied tensor is yielded once
        if id(param) in adapters:
            adapter += _nbytes(param)
        elif id(param) not in packed:
            key = f"weights: {_DTYPES.get(param.dtype, str(param.dtype))}"
            by_dtype[key] = by_dtype.get(key, 0) + _nbytes(param)
    by_dtype["weights: quantized"] = sum(quant_storage_bytes(layer) for layer in layers)
    out: dict[str, int | None] = {"weights": sum(by_dtype.values()) + adapter, **by_dtype, "adapter weights": adapter}
    out["trainable params"] = sum(p.numel() for p in module.parameters() if p.requires_grad)
    out["gradients"] = grads
    out["optimizer state"] = optimizer_state_bytes(optimizer) if optimizer is not None else None
    out["peak"] = _peak(module)[0]
    return out


_RSS = "the process's peak RSS (interpreter, libraries and data included; not comparable, no ratio)"


def _peak(module: nn.Module) -> tuple[int | None, str]:
    """Peak bytes and how they were measured."""
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "torch.cuda.max_memory_allocated"
    try:
        import resource  # POSIX only
    except ImportError:  # pragma: no cover - Windows
        return None, "not measured (no CUDA device, no `resource` module)"
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss = int(usage) if sys.platform == "darwin" else int(usage) * 1024  # Linux reports KiB
    return rss, _RSS


# --------------------------------------------------------------------------- predicting


def _hf_model(module: nn.Module) -> Any:
    transformers = sys.modules.get("transformers")  # never imported: no module can be a HF model
    if transformers is None:
        return None
    return next((m for m in module.modules() if isinstance(m, transformers.PreTrainedModel)), None)


def _predict(
    trainer: L.Trainer, module: nn.Module, optimizer: torch.optim.Optimizer | None, tokens: tuple[int, int] | None
) -> tuple[Estimate | None, str | None]:
    """The estimate for this run, or ``(None, why not)``."""
    model = _hf_model(module)
    if model is None:
        why = "holds no Hugging Face PreTrainedModel, so there is no config to estimate from"
        return None, f"{type(module).__name__} {why}"
    try:
        name = type(model).__name__  # the live class, not the checkpoint's (a BertModel loaded with a new head)
        shape = ModelShape.from_config({**model.config.to_dict(), "architectures": [name]}, name=name)
        _check_accounted(module, model, shape)
        method, options = _method_options(trainer, model, shape)
        options.update(_optimizer_options(optimizer))
        if tokens is not None:
            options["batch_size"], options["seq_len"] = tokens
        return estimate(shape, method, Assumptions(**options)), None
    except ValueError as err:
        return None, f"the estimator cannot describe this run: {err}"


def _check_accounted(module: nn.Module, model: nn.Module, shape: ModelShape) -> None:
    """Raise unless ``shape`` counts every non-adapter parameter of ``module`` (a packed 4-bit tensor as
    the weights it holds): the estimate would silently leave the rest out."""
    inside, adapters = {id(p) for p in model.parameters()}, _adapter_ids(module)
    outside = [n for n, p in module.named_parameters() if id(p) not in inside and id(p) not in adapters]
    if outside:
        more = f" and {len(outside) - 3} more" if len(outside) > 3 else ""
        raise ValueError(f"parameters outside {type(model).__name__} are not modeled: {', '.join(outside[:3])}{more}")
    numel = sum(logical_numel(p) for p in model.parameters() if id(p) not in adapters)
    if numel != shape.total_params:
        raise ValueError(
            f"{type(model).__name__} holds {numel:,} parameters besides adapters; its config describes "
            f"{shape.total_params:,} (a head or layer the estimator does not model)"
        )


def _callback(trainer: L.Trainer, cls: type[L.Callback]) -> Any:
    return next((c for c in trainer.callbacks if isinstance(c, cls)), None)  # type: ignore[attr-defined]


def _weights_dtype(model: nn.Module, adapters: bool) -> Dtype:
    """The dtype holding most bytes among adapter (or non-adapter, non-quantized) parameters."""
    ids = _adapter_ids(model)
    totals: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if (id(p) in ids) == adapters and p.dtype.is_floating_point:
            totals[p.dtype] = totals.get(p.dtype, 0) + _nbytes(p)
    dtype = max(totals, key=lambda d: totals[d]) if totals else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"parameters in {dtype} are not modeled (bf16, fp16 or fp32 only)")
    return _DTYPES[dtype]


def _method_options(trainer: L.Trainer, model: nn.Module, shape: ModelShape) -> tuple[Method, dict[str, Any]]:
    lora: LoRAInjectionCallback | None = _callback(trainer, LoRAInjectionCallback)
    quant: QuantizeBaseCallback | None = _callback(trainer, QuantizeBaseCallback)
    options: dict[str, Any] = {"base_dtype": _weights_dtype(model, adapters=False)}
    if lora is None:
        if quant is not None:
            raise ValueError("a quantized base without LoRA adapters has nothing to train")
        return "full", options
    options.update(rank=lora.spec.r, targets=_targets(lora, shape), adapter_dtype=_weights_dtype(model, adapters=True))
    options["modules_to_save"] = _saved(lora.spec.modules_to_save, shape)
    if quant is None:
        return "lora", options
    options.update(_quant_options(quant, lora.spec.modules_to_save))
    return "qlora", options


def _targets(lora: LoRAInjectionCallback, shape: ModelShape) -> tuple[str, ...]:
    """The estimator's targets for the LoRA spec: ``all-linear``, the default names the shape has, or each
    entry as the longest dotted suffix naming linears of the shape (matched by suffix, as targeting does)."""
    spec, names = lora.spec, list(linear_shapes(shape))
    if spec.exclude_modules:
        raise ValueError(f"exclude_modules={list(spec.exclude_modules)} has no estimator equivalent")
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


def _known(entry: str, names: Sequence[str], argument: str) -> str | None:
    """The longest dotted suffix of ``entry`` that is, or ends, one of ``names``; ``None`` if none does."""
    parts = entry.split(".")
    if not re.fullmatch(r"[\w.]+", entry) or any(part.isdigit() for part in parts):
        raise ValueError(f"{argument} entry {entry!r} is a regex or selects single layers; the estimator needs names")
    suffixes = (".".join(parts[i:]) for i in range(len(parts)))
    return next((x for x in suffixes if any(n == x or n.endswith("." + x) for n in names)), None)


def _quant_options(quant: QuantizeBaseCallback, saved: Sequence[str]) -> dict[str, Any]:
    # the estimator quantizes every linear but task heads and ``modules_to_save`` (which must be skipped)
    if not quant.include_default_skips:
        raise ValueError("include_default_skips=False quantizes output heads; the estimator keeps them unquantized")
    if extra := [entry for entry in quant.skip_modules if entry not in saved]:
        raise ValueError(f"skip_modules={extra!r} outside modules_to_save have no estimator equivalent")
    config = quant.config
    # fp4 is stored exactly like nf4 (codes, absmax, tables)
    kind: Quant = "int8" if config.mode == "int8" else "nf4-dq" if config.double_quant else "nf4"
    compute = _DTYPES.get(config.compute_dtype, "bf16")
    return {"quant": kind, "quant_blocksize": config.blocksize, "quant_compute_dtype": compute}


def _optimizer_options(optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """AdamW kind and per-tensor scalars from the optimizer's class (torch keeps moments in the param dtype)."""
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
    dtypes = {p.dtype for g in optimizer.param_groups for p in g["params"] if p.requires_grad}
    kind = "adamw-fp32" if dtypes <= {torch.float32} else "adamw-16bit"
    return {"optimizer": kind, "state_bytes_per_tensor": 4}  # an fp32 `step` tensor per parameter


# --------------------------------------------------------------------------- the table


def _predicted(est: Estimate, has_optimizer: bool) -> dict[str, int | None]:
    """The estimate in the report's components."""
    a, quantized = est.assumptions, est.quantized_weights_bytes
    return {
        "weights": est.weights_bytes,
        f"weights: {a.base_dtype}": est.base_weights_bytes - quantized,
        "weights: quantized": quantized,
        "adapter weights": est.adapter_bytes,
        "trainable params": est.trainable_params,
        "gradients": est.gradient_bytes,
        "optimizer state": est.optimizer_bytes if has_optimizer else None,
        "peak": est.total_bytes,
    }


_ALWAYS = ("weights", "trainable params", "gradients", "optimizer state", "peak")


def _pair(measured: dict[str, int | None], predicted: dict[str, int | None]) -> _Report:
    """Rows present in either column (empty ones dropped, the main components always kept)."""
    keys = dict.fromkeys([*measured, *predicted])
    return {k: (measured.get(k), predicted.get(k)) for k in keys if k in _ALWAYS or measured.get(k) or predicted.get(k)}


def _cell(component: str, value: int | None) -> str:
    if value is None:
        return "-"
    return format_params(value) if component == "trainable params" else format_bytes(value)


def _format(stage: str, report: _Report, est: Estimate | None, reason: str | None, peak: str) -> str:
    if est is not None:
        a = est.assumptions
        what = est.method if est.method == "full" else f"{est.method} r={a.rank} on {','.join(a.targets)}"
        what += f" + {','.join(a.modules_to_save)} trained fully" if est.method != "full" and a.modules_to_save else ""
        what += f", {a.quant}" if est.method == "qlora" else ""
        source = f"estimate for {est.model}: {what}, {a.base_dtype} base, {a.optimizer}"
    else:
        source = f"no estimate: {reason}"
    lines = [f"lightning-adapt memory report {_STAGES[stage]}; {source}", ""]
    lines += ["| component | measured | estimated | ratio |", "|---|---|---|---|"]
    for component, (measured, predicted) in report.items():
        comparable = measured is not None and predicted and not (component == "peak" and peak == _RSS)
        ratio = f"{measured / predicted:.3f}" if comparable else "-"  # type: ignore[operator]
        lines.append(f"| {component} | {_cell(component, measured)} | {_cell(component, predicted)} | {ratio} |")
    lines.append(f"measured peak: {peak}; estimated peak: weights + gradients + optimizer state + activations")
    return "\n".join(lines)
