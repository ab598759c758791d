"""``MergeOnSaveCallback``: write the PEFT-format adapter and the merged model at the end of fit."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_adapt.export import ExportOptions, ExportResult, check_target, export_model, export_root
from lightning_adapt.inject import LoRASpec


def _modules_to_save(trainer: L.Trainer | None) -> list[str]:
    specs = [getattr(cb, "spec", None) for cb in getattr(trainer, "callbacks", None) or []]
    return [entry for spec in specs if isinstance(spec, LoRASpec) for entry in spec.modules_to_save]


def _tokenizer(pl_module: nn.Module, datamodule: Any) -> Any:
    for owner in (pl_module, datamodule):
        tokenizer = getattr(owner, "tokenizer", None)
        if callable(getattr(tokenizer, "save_pretrained", None)):
            return tokenizer
    return None


def make_probe(pl_module: nn.Module, batch: Any) -> Any:
    """A forward on (up to two rows of) ``batch``: the HF model on ``input_ids``/``attention_mask``, or
    the module on its ``example_input_array``; ``None`` when neither applies."""
    _, root, hf = export_root(pl_module)
    if hf and isinstance(batch, dict) and isinstance(batch.get("input_ids"), torch.Tensor):
        inputs = {k: batch[k][:2].detach().clone() for k in ("input_ids", "attention_mask") if k in batch}
        return lambda: root(**inputs).logits
    example = getattr(pl_module, "example_input_array", None)
    if isinstance(example, torch.Tensor):
        return lambda: pl_module(example)
    return None


def export_lightning_module(
    pl_module: L.LightningModule,
    dirpath: str | Path,
    options: ExportOptions,
    trainer: L.Trainer | None = None,
    datamodule: Any = None,
    probe_batch: Any = None,
    argument: str = "dirpath",
    modules_to_save: list[str] | None = None,
) -> ExportResult:
    """:func:`~lightning_adapt.export.export_model` with what a Lightning run knows: ``modules_to_save`` from
    the LoRA callback (unless given), the tokenizer of the module or datamodule, the source path; prints the merge report."""
    result = export_model(
        pl_module,
        dirpath,
        options,
        modules_to_save=_modules_to_save(trainer) if modules_to_save is None else modules_to_save,
        tokenizer=_tokenizer(pl_module, datamodule),
        probe=make_probe(pl_module, probe_batch),
        argument=argument,
    )
    lines = [f"lightning-adapt: exported to {result.dirpath}"]
    lines += [f"  adapter (PEFT format): {result.adapter}"] if result.adapter else []
    lines += [
        f"  merged model: {result.merged}" + (f" (dropped tied {result.dropped_tied})" if result.dropped_tied else "")
    ]
    lines += [f"  {result.report.format()}"] if result.report else []
    rank_zero_info("\n".join(lines))
    return result


class MergeOnSaveCallback(L.Callback):
    """At the end of fit (and, with ``every_checkpoint``, whenever a checkpoint is saved) write
    ``<dirpath>/adapter`` (PEFT's format: ``PeftModel.from_pretrained(base, path)``) and ``<dirpath>/merged``
    (``W + scale·B A`` under the original keys: ``AutoModel*.from_pretrained`` for Hugging Face models,
    a strict-loadable safetensors state dict otherwise). Writes are atomic; see :mod:`lightning_adapt.export`.

    Example::

        Trainer(callbacks=[LoRAInjectionCallback(r=16), MergeOnSaveCallback(dirpath="out/export")])
    """

    def __init__(
        self,
        dirpath: str | None = None,
        merge_base: Literal["original", "dequantized"] = "original",
        dtype: Literal["fp32", "bf16", "fp16"] | None = None,
        max_shard_size: str = "5GB",
        every_checkpoint: bool = False,
        overwrite: bool = False,
    ) -> None:
        """
        Args:
            dirpath: output directory (``adapter/`` and ``merged/`` inside); must be absent or empty.
                ``None``: ``export/`` inside the run's log directory (e.g. ``outputs/<recipe>/version_3/export``).
            merge_base: QLoRA: ``original`` merges into the full-precision weights re-read from the source
                checkpoint (best quality); ``dequantized`` into the dequantized 4-bit weights. Both are
                compared in a printed report when the source is available.
            dtype: dtype of the merged weights (``fp32``, ``bf16``, ``fp16``); default: the base's own.
            max_shard_size: shard the merged weights above this size (e.g. ``5GB``, ``500MB``).
            every_checkpoint: also export whenever a checkpoint is saved (replacing the previous export).
            overwrite: replace an existing non-empty ``dirpath``.
        """
        super().__init__()
        self._dirpath = Path(dirpath) if dirpath is not None else None
        self.options = ExportOptions(merge_base, dtype, max_shard_size, overwrite)
        self.every_checkpoint = every_checkpoint
        self.result: ExportResult | None = None
        self._probe_batch: Any = None

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self.result is None:  # refuse before training, not after it
            self.dirpath = self._dirpath or Path(trainer.log_dir or trainer.default_root_dir) / "export"
            check_target(self.dirpath, self.options.overwrite, "dirpath")

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._probe_batch is None:
            self._probe_batch = batch

    def export(self, trainer: L.Trainer | None, pl_module: L.LightningModule) -> ExportResult | None:
        """Export now (global rank zero only); later exports in the same run replace the earlier one."""
        if trainer is not None and not trainer.is_global_zero:
            return None
        options = self.options
        if self.result is not None:
            options = ExportOptions(options.merge_base, options.dtype, options.max_shard_size, overwrite=True)
        datamodule = getattr(trainer, "datamodule", None)
        self.result = export_lightning_module(pl_module, self.dirpath, options, trainer, datamodule, self._probe_batch)
        return self.result

    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.every_checkpoint:
            self.export(trainer, pl_module)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.export(trainer, pl_module)
