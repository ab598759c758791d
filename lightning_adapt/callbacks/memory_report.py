"""``MemoryReportCallback``: measured training memory side by side with the estimator's prediction."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.distributed.tensor import DTensor
from typing_extensions import override

from lightning_adapt.callbacks._transform import transform_specs
from lightning_adapt.callbacks.shard import estimate_sharding
from lightning_adapt.errors import ConfigError
from lightning_adapt.layers import adapter_param_ids, dtype_name, quant_storage_bytes, quantized_layers
from lightning_adapt.memory.estimator import Estimate, format_bytes, format_params
from lightning_adapt.memory.live import predict
from lightning_adapt.optim import optimizer_state_bytes
from lightning_adapt.resources import current_rss_bytes, peak_rss_bytes, reset_peak_rss

Stage = Literal["fit_start", "first_step", "fit_end"]
_STAGES = {
    "fit_start": "at fit start (no gradients or optimizer state before the first step)",
    "first_step": "after the first optimizer step",
    "fit_end": "at fit end",
}
#: stage -> component -> (measured, estimated); ``None`` where a figure does not exist (yet).
_Report = dict[str, tuple[int | None, int | None]]


class MemoryReportCallback(L.Callback):
    """Measure weights, trainable parameters, gradients, optimizer state and peak memory; compare each with
    :func:`lightning_adapt.memory.estimate` for the same run (described by :func:`lightning_adapt.memory.live.predict`).

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

    A frozen reference model that the module keeps outside its parameters (``reference_model``, as
    :class:`~lightning_adapt.tasks.PreferenceTask` does for DPO without adapters) is counted as ``reference copy``
    beside the base's size (the estimator's model holds one copy).

    The ``peak`` row compares like with like: the process's measured peak (``torch.cuda.max_memory_allocated`` on
    GPU, the peak resident set size on CPU, both reset at setup) against the process before the model was built
    (measured at setup: interpreter, libraries, data; its own row) plus the estimate. What remains above 1 is what the
    estimator does not model: allocator slack, temporaries, framework buffers, the data loader's batches.

    Example::

        Trainer(callbacks=[LoRAInjectionCallback(r=16), MemoryReportCallback()])

    Attributes:
        reports: ``{stage: {component: (measured, estimated)}}`` for the stages reported so far
            (``fit_start``, ``first_step``, ``fit_end``); bytes, except ``trainable params`` (a count).
        estimate: The estimator's prediction for the run, or ``None`` (see ``no_estimate_reason``).
    """

    def __init__(
        self,
        log_metrics: bool = True,
        activations: bool = True,
        prefix: str = "memory",
        show: list[Stage] | None = None,
    ) -> None:
        """
        Args:
            log_metrics: also send the numbers to the trainer's loggers (if any), not only print them (every stage).
            activations: add the estimator's activation term to the estimated peak, from the first training
                batch's ``input_ids`` shape (batch size, sequence length); a stated 16-bit approximation.
            prefix: first component of the logged metric names.
            show: the stages whose table is printed: ``fit_start``, ``first_step``, ``fit_end``. Default: ``[fit_end]``
                (one table, at the end of fit); every stage is measured and logged whatever this says.
        """
        super().__init__()
        if not isinstance(prefix, str) or not prefix.strip("/"):
            raise ConfigError(f"prefix={prefix!r} must be a non-empty string, e.g. prefix='memory'.")
        self.log_metrics = log_metrics
        self.activations = activations
        self.prefix = prefix.strip("/")
        shown = ["fit_end"] if show is None else list(show)
        wrong = [stage for stage in shown if stage not in _STAGES]
        if wrong:
            raise ConfigError(
                f"show={shown!r}: unknown stage(s) {wrong}; allowed {list(_STAGES)}. Fix: show: [fit_end]."
            )
        self.show = shown
        self._baseline = 0
        self.reports: dict[str, _Report] = {}
        self.estimate: Estimate | None = None
        self.no_estimate_reason: str | None = None
        self._grad_bytes: int | None = None
        self._tokens: tuple[int, int] | None = None

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # the process before the model: now, less what a module built in __init__ already holds; the peak is this
        # run's, not an earlier job's in the same process
        device = trainer.strategy.root_device
        built = sum(_nbytes(p) for p in pl_module.parameters() if p.device == device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self._baseline = max(0, torch.cuda.memory_allocated(device) - built)
        else:
            reset_peak_rss()
            self._baseline = max(0, current_rss_bytes() - built)

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
        specs = transform_specs(trainer)
        self.estimate, self.no_estimate_reason = predict(
            pl_module, specs, optimizer, self._tokens, estimate_sharding(trainer)
        )
        peak, baseline, how = self._peak(pl_module)
        predicted = _predicted(self.estimate, optimizer is not None, baseline) if self.estimate else {}
        measured = _measure(pl_module, optimizer, self._grad_bytes, (peak, baseline))
        if "reference copy" in measured and self.estimate is not None:  # the base once more, frozen
            predicted["reference copy"] = self.estimate.base_weights_bytes
        self.reports[stage] = report = _pair(measured, predicted)
        if stage in self.show:
            text = _format(stage, report, self.estimate, self.no_estimate_reason, how)
            rank_zero_info(text)
        if self.log_metrics and trainer.loggers and trainer.is_global_zero:
            metrics = {
                f"{self.prefix}/{stage}/{component.replace(' ', '_')}_{kind}": float(value)
                for component, values in report.items()
                for kind, value in zip(("measured", "estimated"), values, strict=True)
                if value is not None
            }
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    def _peak(self, module: nn.Module) -> tuple[int, int, str]:
        """The process's peak on the model's device, its size there before the model was built, and how measured."""
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
        if device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(device)), self._baseline, "torch.cuda.max_memory_allocated"
        load = getattr(module, "load_report", None)  # a streaming build measured the process right before it
        baseline = load.baseline_rss_bytes if load is not None else self._baseline
        return peak_rss_bytes(), baseline, "the process's peak RSS"


# --------------------------------------------------------------------------- measuring


def _nbytes(tensor: torch.Tensor) -> int:
    """Bytes this rank holds: an FSDP2-sharded tensor counts its local shard."""
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.numel() * local.element_size()


def _measure(
    module: nn.Module, optimizer: torch.optim.Optimizer | None, grads: int | None, peak: tuple[int, int]
) -> dict[str, int | None]:
    """Measured bytes: weights (per dtype; a quantized layer as codes + quant state), adapter weights,
    the trainable count, gradients, optimizer state, and ``peak``: the process's peak and its size before the model."""
    layers = [layer for _, layer in quantized_layers(module)]
    packed, adapters = {id(layer.weight) for layer in layers}, adapter_param_ids(module)
    by_dtype: dict[str, int] = {}
    adapter = 0
    for param in module.parameters():  # a tied tensor is yielded once
        if id(param) in adapters:
            adapter += _nbytes(param)
        elif id(param) not in packed:
            key = f"weights: {dtype_name(param.dtype)}"
            by_dtype[key] = by_dtype.get(key, 0) + _nbytes(param)
    by_dtype["weights: quantized"] = sum(quant_storage_bytes(layer) for layer in layers)
    out: dict[str, int | None] = {"weights": sum(by_dtype.values()) + adapter, **by_dtype, "adapter weights": adapter}
    reference = getattr(module, "reference_model", None)  # a frozen copy outside the module (PreferenceTask)
    if isinstance(reference, nn.Module):
        out["reference copy"] = sum(_nbytes(p) for p in reference.parameters())
    out["trainable params"] = sum(p.numel() for p in module.parameters() if p.requires_grad)
    out["gradients"] = grads
    out["optimizer state"] = optimizer_state_bytes(optimizer) if optimizer is not None else None
    out["peak"], out[BEFORE] = peak
    load = getattr(module, "load_report", None)
    if load is not None:
        out["load peak"] = load.load_peak_bytes
    return out


# --------------------------------------------------------------------------- the table


#: The process before the model was built: the part of the measured peak the estimator does not model, added to its
#: estimate so that the ``peak`` row compares the whole process with the whole process.
BEFORE = "process before the model"


def _predicted(est: Estimate, has_optimizer: bool, baseline: int) -> dict[str, int | None]:
    """The estimate in the report's components; the peak on the process's footing (``baseline`` + the estimate)."""
    a, quantized = est.assumptions, est.quantized_weights_bytes
    return {
        "weights": est.weights_bytes,
        f"weights: {a.base_dtype}": est.base_weights_bytes - quantized,
        "weights: quantized": quantized,
        "adapter weights": est.adapter_bytes,
        "trainable params": est.trainable_params,
        "gradients": est.gradient_bytes,
        "optimizer state": est.optimizer_bytes if has_optimizer else None,
        "peak": baseline + est.total_bytes,
    }


_ALWAYS = ("weights", "trainable params", "gradients", "optimizer state", "peak")


_ZERO_IS_MEASURED = ("load peak",)


def _pair(measured: dict[str, int | None], predicted: dict[str, int | None]) -> _Report:
    """Rows present in either column (empty ones dropped, the main components always kept; a load peak of 0, when
    the allocator reused pages freed earlier, is a measurement and kept)."""
    keys = dict.fromkeys([*measured, *predicted])

    def shown(k: str) -> bool:
        zero_measured = k in _ZERO_IS_MEASURED and measured.get(k) is not None
        return k in _ALWAYS or bool(measured.get(k) or predicted.get(k)) or zero_measured

    return {k: (measured.get(k), predicted.get(k)) for k in keys if shown(k)}


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
        comparable = measured is not None and predicted
        ratio = f"{measured / predicted:.3f}" if comparable else "-"  # type: ignore[operator]
        lines.append(f"| {component} | {_cell(component, measured)} | {_cell(component, predicted)} | {ratio} |")
    lines.append(
        f"peak: {peak}, against the {BEFORE} (measured at setup) + the estimate (weights + gradients + optimizer "
        "state + activations); above 1: what the estimator does not model (allocator slack, temporaries, the data)"
    )
    return "\n".join(lines)
