"""Measure the trained QLoRA model and both merges with Lightning's own validation loop (``merge: evaluate``).

Each model is validated by a fresh single-device ``Trainer`` on the run's validation data, so the metrics are
whatever the module logs (``val_loss`` / ``val_ppl`` for ``CausalLMTask``, ``val_acc`` / ``val_f1`` for
``SequenceClassificationTask``). The merges are the live model with its quantized layers swapped for dense
merged ones (:func:`~lightning_adapt.export.report.dense_layers`), one merge at a time. The module is lent, not changed:
its attributes (trainer reference, the task's last metrics), layers and device are put back afterwards.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities.model_helpers import is_overridden
from typing_extensions import override

from lightning_adapt.export.merge_eval import MergeEvaluation, available_bytes
from lightning_adapt.export.original import optional_source
from lightning_adapt.export.peft_format import export_root
from lightning_adapt.export.report import dense_bytes, dense_layers, merged_weights
from lightning_adapt.export.safetensors_io import SourceWeights
from lightning_adapt.layers import quantized_layers

__all__ = ["evaluate_merges", "monitored"]


class _StayOnDevice(SingleDeviceStrategy):
    """Lightning's teardown moves the module to the CPU; the run it is borrowed from goes on with it where it is."""

    @override
    def teardown(self) -> None:
        self.precision_plugin.teardown()
        if self.accelerator is not None:
            self.accelerator.teardown()
        self.checkpoint_io.teardown()


def monitored(trainer: L.Trainer | None) -> tuple[str, Literal["min", "max"]]:
    """The metric (and its better direction) the run monitors: its first ``ModelCheckpoint`` or
    ``EarlyStopping`` with a ``monitor``; else ``("val_loss", "min")``."""
    callbacks = [*trainer.checkpoint_callbacks, *trainer.early_stopping_callbacks] if trainer is not None else []
    for callback in callbacks:
        monitor = getattr(callback, "monitor", None)
        if monitor:
            return str(monitor), "max" if getattr(callback, "mode", "min") == "max" else "min"
    return "val_loss", "min"


def _data(trainer: L.Trainer | None, module: L.LightningModule, datamodule: Any) -> dict[str, Any] | None:
    """``trainer.validate``'s data argument: the DataModule if it has validation data, else the run's loaders."""
    if not is_overridden("validation_step", module, L.LightningModule):
        return None
    if isinstance(datamodule, L.LightningDataModule) and is_overridden("val_dataloader", datamodule):
        return {"datamodule": datamodule}
    loaders = getattr(trainer, "val_dataloaders", None) if trainer is not None else None
    return {"dataloaders": loaders} if loaders is not None else None


@contextmanager
def _lent(module: L.LightningModule, datamodule: Any) -> Iterator[None]:
    """Put back what another trainer's ``validate`` changes: the module's and the DataModule's attributes (their
    trainer, a task's ``last_val``) and the module's device. ``configure_model`` is a no-op meanwhile: the
    transforms ran already, and run again they would quantize (and adapt) the dense merged layers."""
    saved, device = dict(vars(module)), module.device
    data_trainer = getattr(datamodule, "trainer", None)
    vars(module)["configure_model"] = types.MethodType(lambda self: None, module)
    quiet = logging.getLogger("lightning.pytorch")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # no "GPU available" lines per model
    try:
        yield
    finally:
        quiet.setLevel(level)
        for key in set(vars(module)) - set(saved):
            del vars(module)[key]
        vars(module).update(saved)
        if datamodule is not None:
            datamodule.trainer = data_trainer
        module.to(device)


def _validate(module: L.LightningModule, like: L.Trainer | None, data: dict[str, Any], limit: int | float) -> dict[str, float]:  # fmt: skip
    device = module.device
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else device.type, strategy=_StayOnDevice(device),
        precision=like.precision if like is not None else "32-true", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=limit, num_sanity_val_steps=0,
    )  # fmt: skip
    results = trainer.validate(module, verbose=False, **data)
    return {key: float(value) for result in results for key, value in result.items()}


def _obstacle(like: L.Trainer | None, root: torch.nn.Module, device: torch.device) -> str | None:
    """Why the merges cannot be evaluated here; ``None`` when they can."""
    fix = (
        "Fix: evaluate afterwards in one process where it fits: lightning-adapt export --config <recipe> "
        "--ckpt_path <ckpt> --output <dir>; merge: evaluate: false skips it"
    )
    if like is not None and like.world_size > 1:
        return f"it runs in one process, and this run has {like.world_size}. {fix}"
    need, free = dense_bytes(root), available_bytes(device)
    if free and need > 0.9 * free:
        return f"the merged layers need {need / 1e9:.2f} GB in their compute dtype, {free / 1e9:.2f} GB free on {device}. {fix}"  # fmt: skip
    return None


def evaluate_merges(
    like: L.Trainer | None,
    module: L.LightningModule,
    datamodule: Any = None,
    merge_base: str = "original",
    eval_batches: int | None = None,
    original: SourceWeights | None = None,
) -> MergeEvaluation | None:
    """Validate the trained model, then ``original`` (if its source weights are there) and ``dequantized``.

    Args:
        like: the run's trainer (precision, ``limit_val_batches``, the monitored metric, the validation loaders
            when there is no DataModule); ``None``: fp32, every batch, ``val_loss``.
        module: the trained module, quantized layers and adapters live; put back as it was.
        datamodule: where the validation data comes from (``val_dataloader``).
        merge_base: the merge the export wrote (the report says whether it is the recommended one).
        eval_batches: validation batches per model; ``None``: the trainer's ``limit_val_batches``.
        original: the quantized layers' original weights, found already; ``None``: looked for here.

    Returns:
        ``None`` when ``module`` has no quantized layer (both merges are the trained model); else the metrics,
        or only notes saying why nothing was measured.
    """
    _, root, _ = export_root(module)
    if not quantized_layers(root):
        return None
    monitor, mode = monitored(like)
    data = _data(like, module, datamodule)
    limit = eval_batches if eval_batches is not None else (like.limit_val_batches if like is not None else 1.0)
    why = _obstacle(like, root, module.device)
    if data is None or not limit or why:
        why = why or ("limit_val_batches is 0. Fix: set merge: eval_batches" if data else "no validation data")
        return MergeEvaluation({}, monitor, mode, merge_base, notes=(why,))
    source = original or optional_source(module, root, None, "dequantized")
    metrics: dict[str, dict[str, float]] = {}
    with _lent(module, datamodule if "datamodule" in data else None), torch.no_grad():
        metrics["trained"] = _validate(module, like, data, limit or 1.0)
        for variant, weights in (("original", source), ("dequantized", None)):
            if variant == "dequantized" or weights is not None:
                with dense_layers(root, merged_weights(root, weights)):
                    metrics[variant] = _validate(module, like, data, limit)
    notes = () if source is not None else ("original: its source weights were not found (source_path)",)
    return MergeEvaluation(metrics, monitor, mode, merge_base, limit, notes)
