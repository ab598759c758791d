"""Will the run fit? Its estimate set against the memory its device has left, and the changes that would fit.

Pure Python (no Lightning, no torch). The fit check (``callbacks/fit_check.py``) describes the run before any weight
is read (:func:`lightning_adapt.memory.live.describe_run` on the model built on the meta device) and reads the
device (:func:`lightning_adapt.resources.available_memory_bytes`); this module decides (docs/memory.md):

- ``certain`` = weights + gradients + optimizer state. Runs measure these equal to the estimate, to the byte, and
  the first optimizer step holds all three at once (it creates the optimizer state while the gradients are
  complete). A paged optimizer's state can leave a GPU for host memory, so there it is not counted.
- ``need`` = ``certain`` + activations, a stated approximation for the configured batch size and sequence length.
- **fits**: ``need <= available``. **does not fit**: ``certain`` exceeds ``available`` by more than
  :data:`REFUSAL_MARGIN` (5%): the run cannot hold what its first step must hold, whatever its activations are;
  ``fit_check: error`` refuses it. **may not fit**: in between (the activation term, the approximate part, and the
  5% are the margin): a warning, never a refusal.

Example:
    >>> from lightning_adapt.memory.estimator import Assumptions, load_model_shape
    >>> gpu = Device("cuda:0", 24 * 2**30, "free memory of cuda:0")
    >>> check_fit(load_model_shape("llama-2-7b"), "full", Assumptions(optimizer="adamw-16bit"), gpu).verdict
    'does not fit'
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

from lightning_adapt.memory.estimator import Assumptions, Estimate, Method, ModelShape, estimate, format_bytes

__all__ = ["REFUSAL_MARGIN", "Change", "Device", "FitCheck", "Verdict", "check_fit", "on_device"]

Verdict = Literal["fits", "may not fit", "does not fit"]
#: How far weights + gradients + optimizer state must exceed the free memory for a refusal: what a process may serve
#: from memory it holds already (freed heap it keeps resident, a data set tokenized and dropped at setup) is in
#: neither figure. Measured: the tiny Llama's LoRA run peaked 0.3 MB below its baseline + its 12.9 MB of weights, so
#: it served at least that and its activations from its own heap (tests/callbacks/test_memory_report.py).
REFUSAL_MARGIN = 0.05
_METHODS = {"full": "full fine-tuning", "lora": "LoRA", "qlora": "QLoRA"}
#: What every change suggested to a full fine-tuning run adapts (the QLoRA paper's choice: every block linear).
SUGGESTED_LORA_RANK, SUGGESTED_LORA_TARGETS = 16, ("all-linear",)


@dataclass(frozen=True)
class Device:
    """Where the run trains: its ``name`` (``cpu``, ``cuda:0``), the bytes a new allocation can take there, where
    that figure was read, and whether a paged optimizer's state can leave it (CUDA: bitsandbytes' paged memory)."""

    name: str
    available: int
    source: str
    pages: bool = False


@dataclass(frozen=True)
class Change:
    """One change to the run: the setting to write, the estimate with it, what it needs on the device."""

    setting: str
    estimate: Estimate
    need: int
    fits: bool


@dataclass(frozen=True)
class FitCheck:
    """The verdict on one run: its estimate, the device, ``certain`` and ``need`` (see the module docstring), and
    when it does not fit, the changes that would, cheapest first (none does: each change, and all of them together)."""

    estimate: Estimate
    device: Device
    paged: bool
    certain: int
    need: int
    verdict: Verdict
    changes: tuple[Change, ...] = ()

    def summary(self) -> str:
        """One line: what the run needs on the device against what the device has."""
        est = self.estimate
        opt = "optimizer state paged out" if self.paged else f"optimizer state {format_bytes(est.optimizer_bytes)}"
        parts = f"weights {format_bytes(est.weights_bytes)} + gradients {format_bytes(est.gradient_bytes)} + {opt}"
        if est.activation_bytes:
            parts += f" = {format_bytes(self.certain)}, + activations{_tokens(est)}"
        else:
            parts += " (activations not estimated: batch size and sequence length unknown)"
        return (
            f"{_what(est)} on {self.device.name} needs an estimated {format_bytes(self.need)} ({parts}); "
            f"{self.device.source}: {format_bytes(self.device.available)}"
        )

    def message(self) -> str:
        """The refusal (or warning): the estimate by component, the memory available, each change with its estimate
        and a ``Fix:``."""
        room = self.device.available
        if self.verdict == "does not fit":
            head = (
                f"fit_check: the run does not fit: {self.summary()}. Its first optimizer step alone holds "
                f"{format_bytes(self.certain)} (weights, gradients and optimizer state, which runs measure equal to "
                "this estimate)."
            )
        else:
            why = (
                "Weights, gradients and optimizer state fit; with the activations, an approximation, it may not."
                if self.certain <= room
                else f"Weights, gradients and optimizer state exceed it by less than {REFUSAL_MARGIN:.0%}, what the "
                "process may serve from memory it holds already."
            )
            head = f"fit_check: the run may not fit: {self.summary()}. {why}"
        fitting = all(change.fits for change in self.changes)
        lines = [
            head,
            "Changes that fit, each with its estimate:" if fitting else "No change fits alone; each, estimated:",
        ]
        for change in self.changes:
            state = "fits" if change.fits else f"{format_bytes(change.need - room)} short"
            lines.append(f"  - {change.setting}: {format_bytes(change.need)} ({state})")
        fix = "Fix: make a change that fits, train on a device with more free memory, or shard the model over more GPUs"
        lines.append(f"{fix} (shard:); fit_check: warn tries anyway, fit_check: off skips this check.")
        return "\n".join(lines)


def on_device(est: Estimate, paged: bool) -> tuple[int, int]:
    """``(certain, need)`` on the device: weights + gradients + optimizer state (unless ``paged`` out), and that
    plus the activations."""
    certain = est.weights_bytes + est.gradient_bytes + (0 if paged else est.optimizer_bytes)
    return certain, certain + est.activation_bytes


def check_fit(
    shape: ModelShape, method: Method, assumptions: Assumptions, device: Device, paged: bool = False
) -> FitCheck:
    """The verdict for ``method`` on ``shape`` under ``assumptions`` (per rank), on ``device``; ``paged``: the run's
    optimizer is a paged one (its state leaves the device only where ``device.pages``)."""
    est = estimate(shape, method, assumptions)
    certain, need = on_device(est, paged and device.pages)
    verdict: Verdict = "fits" if need <= device.available else "may not fit"
    if certain > device.available * (1 + REFUSAL_MARGIN):
        verdict = "does not fit"
    changes = _changes(shape, method, assumptions, device, paged) if verdict != "fits" else ()
    return FitCheck(est, device, paged and device.pages, certain, need, verdict, changes)


def _changes(shape: ModelShape, method: Method, a: Assumptions, device: Device, paged: bool) -> tuple[Change, ...]:
    """Each change alone, cheapest first (a smaller batch, activation checkpointing, a paged 8-bit optimizer, LoRA,
    QLoRA), then all of them together when none fits alone."""
    options: list[tuple[str, Method, Assumptions, bool]] = []
    if a.batch_size is not None and a.batch_size > 1:
        options.append(_smaller_batch(shape, method, a, device, paged))
    if a.batch_size is not None and not a.activation_checkpointing:
        ckpt = replace(a, activation_checkpointing=True)
        setting = "activation checkpointing (the causal-LM tasks: model.init_args.activation_checkpointing: true)"
        options.append((setting, method, ckpt, paged))
    if not (paged and a.optimizer == "adamw-8bit"):
        where = ", its state paged to host memory when short" if device.pages else ""
        eight = replace(a, optimizer="adamw-8bit", state_bytes_per_tensor=0)
        options.append((f"paged_optimizer: PagedAdamW8bit (8-bit AdamW{where})", method, eight, True))
    adapters = a if method != "full" else _as_lora(shape, a)
    if method == "full":
        options.append((f"lora: {_lora_text(adapters)}", "lora", adapters, paged))
    if method != "qlora":
        also = f" with lora: {_lora_text(adapters)}" if method == "full" else ""
        options.append(
            (f"quantize: nf4, double_quant (QLoRA){also}", "qlora", replace(adapters, quant="nf4-dq"), paged)
        )
    changes = [_change(setting, shape, m, b, device, p) for setting, m, b, p in options]
    if any(change.fits for change in changes):
        return tuple(change for change in changes if change.fits)
    if len(options) > 1:
        method_all, all_of_them, paged_all = _combined(options)
        changes.append(_change("all of these together", shape, method_all, all_of_them, device, paged_all))
    return tuple(changes)


def _change(setting: str, shape: ModelShape, method: Method, a: Assumptions, device: Device, paged: bool) -> Change:
    est = estimate(shape, method, a)
    need = on_device(est, paged and device.pages)[1]
    return Change(setting, est, need, need <= device.available)


def _smaller_batch(
    shape: ModelShape, method: Method, a: Assumptions, device: Device, paged: bool
) -> tuple[str, Method, Assumptions, bool]:
    """The largest batch below the run's that fits (1 if none does), with the accumulation that keeps the batch."""
    batch = a.batch_size or 1
    smaller = next(
        (
            b
            for b in range(batch - 1, 0, -1)
            if _change("", shape, method, replace(a, batch_size=b), device, paged).fits
        ),
        1,
    )
    steps = math.ceil(batch / smaller)
    setting = f"data.init_args.batch_size: {smaller} (with trainer.accumulate_grad_batches: {steps}, {smaller * steps}"
    setting += f" sequences per optimizer step; now {batch})"
    return setting, method, replace(a, batch_size=smaller), paged


def _as_lora(shape: ModelShape, a: Assumptions) -> Assumptions:
    """A full fine-tuning run's assumptions as LoRA: fp32 adapters (torch AdamW keeps fp32 moments for them), task
    heads trained fully (they start untrained)."""
    optimizer = "adamw-fp32" if a.optimizer == "adamw-16bit" else a.optimizer
    saved = tuple(head.name for head in shape.heads)
    suggested = replace(a, rank=SUGGESTED_LORA_RANK, targets=SUGGESTED_LORA_TARGETS, adapter_dtype="fp32")
    return replace(suggested, optimizer=optimizer, modules_to_save=saved)


def _lora_text(a: Assumptions) -> str:
    saved = f", modules_to_save: [{', '.join(a.modules_to_save)}]" if a.modules_to_save else ""
    return f"r: {a.rank}, target_modules: {','.join(a.targets)}{saved}"


def _combined(options: list[tuple[str, Method, Assumptions, bool]]) -> tuple[Method, Assumptions, bool]:
    """Every change applied together: the last method named (QLoRA if suggested) with each change's settings."""
    method, a, paged = options[-1][1], options[-1][2], any(p for *_, p in options)
    for _, _, other, _ in options:
        a = replace(a, batch_size=min(a.batch_size or 1, other.batch_size or 1) if a.batch_size else None)
        a = replace(a, activation_checkpointing=a.activation_checkpointing or other.activation_checkpointing)
        if other.optimizer == "adamw-8bit":
            a = replace(a, optimizer="adamw-8bit", state_bytes_per_tensor=0)
    return method, a, paged


def _what(est: Estimate) -> str:
    a = est.assumptions
    per_rank = f", per rank of {a.world_size} ({a.strategy})" if a.world_size > 1 else ""
    return f"{_METHODS[est.method]} of {est.model} ({a.base_dtype} base, {a.optimizer}{per_rank})"


def _tokens(est: Estimate) -> str:
    a = est.assumptions
    return f" {format_bytes(est.activation_bytes)} (batch {a.batch_size} x {a.seq_len} tokens)" if a.batch_size else ""
