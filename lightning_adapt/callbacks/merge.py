"""``MergeOnSaveCallback``: write the PEFT-format adapter and the merged model at the end of fit."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_adapt.adapters.inject import LoRASpec
from lightning_adapt.callbacks._transform import transform_specs
from lightning_adapt.errors import ExportError
from lightning_adapt.export.exporter import (
    ExportOptions,
    ExportResult,
    check_target,
    export_model,
    find_tokenizer,
    make_probe,
)


class MergeOnSaveCallback(L.Callback):
    """At the end of fit (and, with ``every_checkpoint``, whenever a checkpoint is saved) write
    ``<dirpath>/adapter`` (PEFT's format: ``PeftModel.from_pretrained(base, path)``) and ``<dirpath>/merged``
    (``W + scale·B A`` under the original keys: ``AutoModel*.from_pretrained`` for Hugging Face models,
    a strict-loadable safetensors state dict otherwise). Writes are atomic; see :mod:`lightning_adapt.export`.
    ``lightning-adapt export`` goes through :meth:`export` too.

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
        self.dirpath: Path | None = Path(dirpath) if dirpath is not None else None
        self.options = ExportOptions(merge_base, dtype, max_shard_size, overwrite)
        self.every_checkpoint = every_checkpoint
        self.result: ExportResult | None = None
        self._probe_batch: Any = None
        self.argument = "dirpath"

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self.result is None:  # refuse before training, not after it
            self.dirpath = self.dirpath or Path(trainer.log_dir or trainer.default_root_dir) / "export"
            check_target(self.dirpath, self.options.overwrite, self.argument)

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._probe_batch is None:
            self._probe_batch = batch

    def export(
        self, trainer: L.Trainer | None, pl_module: L.LightningModule, datamodule: Any = None, probe_batch: Any = None
    ) -> ExportResult | None:
        """Export now (global rank zero only); later exports in the same run replace the earlier one.

        ``modules_to_save`` come from the run's LoRA settings, the tokenizer from the module or the datamodule,
        the probe of the merge report from ``probe_batch`` (default: the first training batch).
        """
        if trainer is not None and not trainer.is_global_zero:
            return None
        if self.dirpath is None:
            raise ExportError(f"MergeOnSaveCallback.export: no {self.argument} set. Fix: pass dirpath=...")
        options = self.options if self.result is None else replace(self.options, overwrite=True)
        datamodule = datamodule or getattr(trainer, "datamodule", None)
        specs = [spec for spec in transform_specs(trainer) if isinstance(spec, LoRASpec)]
        self.result = result = export_model(
            pl_module,
            self.dirpath,
            options,
            modules_to_save=[entry for spec in specs for entry in spec.modules_to_save],
            tokenizer=find_tokenizer(pl_module, datamodule),
            probe=make_probe(pl_module, self._probe_batch if probe_batch is None else probe_batch),
            argument=self.argument,
        )
        lines = [f"lightning-adapt: exported to {result.dirpath}"]
        lines += [f"  adapter (PEFT format): {result.adapter}"] if result.adapter else []
        dropped = f" (dropped tied {result.dropped_tied})" if result.dropped_tied else ""
        lines += [f"  merged model: {result.merged}{dropped}"]
        lines += [f"  {result.report.format()}"] if result.report else []
        rank_zero_info("\n".join(lines))
        return result

    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.every_checkpoint:
            self.export(trainer, pl_module)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.export(trainer, pl_module)
