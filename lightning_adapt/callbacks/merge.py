"""``MergeOnSaveCallback``: write the PEFT-format adapter and the merged model at the end of fit.

At the end of fit the live model is merged tensor by tensor from its own weights (:func:`~.exporter.export_model`).
``lightning-adapt export`` comes through :meth:`MergeOnSaveCallback.export_checkpoint`: the checkpoint's adapters
stream into the base's safetensors files and no model is built (:mod:`lightning_adapt.export.stream_export`); when
that cannot work, through :meth:`MergeOnSaveCallback.export` on the rebuilt model. With a quantized base
and validation data, the trained model and both merges are then validated (``evaluate``, :mod:`._merge_eval`).
"""

from __future__ import annotations

import sys
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import lightning as L
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_adapt.adapters.checkpoint import FINGERPRINT_KEY
from lightning_adapt.adapters.inject import LoRASpec
from lightning_adapt.callbacks._merge_eval import evaluate_merges
from lightning_adapt.callbacks._sharded_export import gather_trainable, run_on_rank_zero
from lightning_adapt.callbacks._transform import transform_specs
from lightning_adapt.errors import ConfigError, ExportError, setting_names
from lightning_adapt.export.exporter import (
    ExportOptions,
    ExportResult,
    check_target,
    export_model,
    find_tokenizer,
    make_probe,
)
from lightning_adapt.export.gguf_export import check_gguf
from lightning_adapt.export.merged_state import check_tied_adapters
from lightning_adapt.export.original import optional_source, request_spill
from lightning_adapt.export.peft_format import export_root
from lightning_adapt.export.stream_export import (
    checkpoint_streaming_unavailable,
    export_checkpoint_streamed,
)
from lightning_adapt.quantize import QuantPlan


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
        evaluate: bool = True,
        eval_batches: int | None = None,
        format: Literal["safetensors", "gguf"] = "safetensors",
        gguf_type: Literal["f32", "f16", "bf16", "q8_0"] = "f16",
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
            evaluate: QLoRA with validation data: after the export, validate the trained model and both merges
                (``original``, ``dequantized``) and print each one's validation metrics (what the module logs,
                e.g. ``val_loss`` / ``val_ppl``) and the better merge, by the run's monitored metric (its
                ``ModelCheckpoint`` / ``EarlyStopping`` ``monitor`` and ``mode``; default: lower ``val_loss``).
                ``merge_base`` still decides what is written. The merges are the live model with its quantized
                layers swapped for dense merged ones, one merge at a time: it needs the float size of those
                layers free, else it is skipped with a message (then evaluate afterwards where it fits,
                ``lightning-adapt export``). Not with ``every_checkpoint`` saves, not under FSDP2 / several
                processes. ``false``: skip it.
            eval_batches: validation batches per evaluated model; ``None``: the trainer's ``limit_val_batches``.
            format: ``safetensors`` (``merged/``) or ``gguf``: the merged model as one file for llama.cpp, Ollama or
                LM Studio (``gguf/model-<gguf_type>.gguf``) and, where llama.cpp can apply them, the adapters
                (``gguf/adapter-f32.gguf``), in place of ``merged/``. Llama, Mistral and Qwen2 models
                (SmolLM2 included); others are refused before training.
            gguf_type: with ``format: gguf``: ``f32``, ``f16``, ``bf16`` or ``q8_0`` (8-bit) for the matrices.
        """
        super().__init__()
        if eval_batches is not None and eval_batches < 1:
            raise ConfigError(
                f"merge: eval_batches={eval_batches} must be >= 1 or None (every batch). Fix: eval_batches: 8."
            )
        self.evaluate, self.eval_batches = evaluate, eval_batches
        self.dirpath: Path | None = Path(dirpath) if dirpath is not None else None
        self.options = ExportOptions(merge_base, dtype, max_shard_size, overwrite, format, gguf_type)
        self.every_checkpoint = every_checkpoint
        self.result: ExportResult | None = None
        self._probe_batch: Any = None
        self.measure_memory = False  # the export's peak memory: measured when the run has a memory report

    @staticmethod
    def reports_memory(trainer: L.Trainer) -> bool:
        """Whether ``trainer``'s run has a ``MemoryReportCallback``, which asks for the export's memory."""
        report = getattr(sys.modules.get("lightning_adapt.callbacks.memory_report"), "MemoryReportCallback", None)
        return isinstance(report, type) and any(isinstance(cb, report) for cb in trainer.callbacks)  # type: ignore[attr-defined]

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        sharded = isinstance(trainer.strategy, ModelParallelStrategy)
        self.measure_memory = self.reports_memory(trainer)
        if sharded:
            _check_sharded_export(pl_module, transform_specs(trainer), self.options.merge_base)
        if stage == "fit" and self.result is None:  # refuse before training, not after it
            run_dir = Path(trainer.log_dir or trainer.default_root_dir)
            self.dirpath = self.dirpath or run_dir / "export"
            with setting_names(target="dirpath"):
                check_target(self.dirpath, self.options.overwrite)
            if self.options.merge_base == "original" and trainer.is_global_zero and not sharded:
                request_spill(pl_module, run_dir)  # a module built in full precision keeps its originals on disk

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Check what the export will need now, so that a setting that cannot work fails before the first step."""
        if not trainer.is_global_zero or isinstance(trainer.strategy, ModelParallelStrategy):
            return
        _, root, _ = export_root(pl_module)
        check_tied_adapters(root)
        if self.options.format == "gguf":
            check_gguf(root)
        optional_source(pl_module, root, None, self.options.merge_base)  # merge_base='original': the originals

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        request_spill(pl_module, None)

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._probe_batch is None:
            self._probe_batch = batch

    def export(
        self, trainer: L.Trainer | None, pl_module: L.LightningModule, datamodule: Any = None, probe_batch: Any = None,
        evaluate: bool | None = None,
    ) -> ExportResult | None:  # fmt: skip
        """Export now (global rank zero only); later exports in the same run replace the earlier one.

        The live model is merged tensor by tensor from its own weights (QLoRA's ``merge_base: original``: the
        quantized layers' originals re-read from its source files). ``modules_to_save`` come from the run's LoRA
        settings, the tokenizer from the module or the datamodule, the probe of the merge report from
        ``probe_batch`` (default: the first training batch). ``evaluate``: measure the merges
        (:meth:`evaluate_merges`); ``None``: the callback's ``evaluate``. Under FSDP2 the gathered adapters
        stream into the source files instead (:meth:`export_checkpoint`).
        """
        if trainer is not None and isinstance(trainer.strategy, ModelParallelStrategy):
            return self._export_sharded(trainer, pl_module, datamodule)
        if trainer is not None and not trainer.is_global_zero:
            return None
        datamodule = datamodule or getattr(trainer, "datamodule", None)
        specs = [spec for spec in transform_specs(trainer) if isinstance(spec, LoRASpec)]
        options = self._options()
        _, root, _ = export_root(pl_module)
        if options.format == "gguf":
            check_gguf(root)
        original = optional_source(pl_module, root, None, options.merge_base)  # headers read once: export + eval
        result = export_model(
            pl_module, self._dirpath(), options,
            modules_to_save=[entry for spec in specs for entry in spec.modules_to_save],
            tokenizer=find_tokenizer(pl_module, datamodule),
            probe=make_probe(pl_module, self._probe_batch if probe_batch is None else probe_batch),
            original=original,
        )  # fmt: skip
        if self.evaluate if evaluate is None else evaluate:
            result.evaluation = evaluate_merges(
                trainer, pl_module, datamodule, options.merge_base, self.eval_batches, original
            )
        return self._announce(result)

    def evaluates(self, specs: list[object]) -> bool:
        """Whether :meth:`evaluate_merges` has anything to measure for a run with these transform ``specs``."""
        return self.evaluate and any(isinstance(spec, QuantPlan) for spec in specs)

    def evaluate_merges(self, trainer: L.Trainer | None, pl_module: L.LightningModule, datamodule: Any = None) -> None:
        """Validate the trained model and both merges (see ``evaluate``) and print the comparison; kept in
        ``self.result.evaluation``. For ``lightning-adapt export``, after :meth:`export_checkpoint`."""
        evaluation = evaluate_merges(trainer, pl_module, datamodule, self.options.merge_base, self.eval_batches)
        if self.result is not None:
            self.result.evaluation = evaluation
        if evaluation is not None:
            rank_zero_info("lightning-adapt: " + evaluation.format().replace("\n", "\n  "))

    def export_checkpoint(
        self, module: L.LightningModule, state_dict: dict[str, Any], specs: list[object], datamodule: Any = None
    ) -> ExportResult:
        """Export an adapter-only checkpoint's ``state_dict`` without building the model: its adapters are merged
        into the module's source files as they stream by (``specs``: the run's ``LoRASpec``, ``QuantPlan``).
        Call :func:`checkpoint_streaming_unavailable` first. With a ``QuantPlan``, the merge report compares
        original and dequantized merges of the adapted layers, each re-quantized as it streams by."""
        lora = next(spec for spec in specs if isinstance(spec, LoRASpec))
        plan = next((spec for spec in specs if isinstance(spec, QuantPlan)), None)
        tokenizer = find_tokenizer(module, datamodule)
        result = export_checkpoint_streamed(module, state_dict, lora, plan, self._dirpath(), self._options(), tokenizer)
        return self._announce(result)

    def _export_sharded(self, trainer: L.Trainer, pl_module: L.LightningModule, datamodule: Any) -> ExportResult | None:
        """FSDP2: every rank gathers the adapters, rank 0 streams the merge from the source files
        (:mod:`lightning_adapt.callbacks._sharded_export`)."""
        state = gather_trainable(pl_module, keep=trainer.is_global_zero)
        specs = transform_specs(trainer)
        datamodule = datamodule or getattr(trainer, "datamodule", None)
        work = setting_names(ckpt_path="the sharded run")(
            partial(self.export_checkpoint, pl_module, state, specs, datamodule)
        )
        result: ExportResult | None = run_on_rank_zero(trainer, work, "merge: the export")
        return result

    def _dirpath(self) -> Path:
        if self.dirpath is None:
            raise ExportError("MergeOnSaveCallback.export: no dirpath set. Fix: pass dirpath=...")
        return self.dirpath

    def _options(self) -> ExportOptions:
        overwrite = self.options.overwrite or self.result is not None  # a later export replaces the earlier one
        return replace(self.options, overwrite=overwrite, measure_memory=self.measure_memory)

    def _announce(self, result: ExportResult) -> ExportResult:
        self.result = result
        how = "streamed from the source files" if result.streamed else "merged from the live model"
        lines = [f"lightning-adapt: exported to {result.dirpath} ({how})"]
        lines += [f"  adapter (PEFT format): {result.adapter}"] if result.adapter else []
        dropped = f" (dropped tied {result.dropped_tied})" if result.dropped_tied else ""
        lines += [f"  merged model: {result.merged}{dropped}"] if result.merged else []
        lines += [f"  GGUF (llama.cpp): {path}" for path in result.gguf]
        lines += [f"  {result.report.format()}"] if result.report else []
        lines += [f"  {result.memory.format()}"] if result.memory else []
        lines += ["  " + result.evaluation.format().replace("\n", "\n  ")] if result.evaluation else []
        rank_zero_info("\n".join(lines))
        return result

    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.every_checkpoint:
            self.export(trainer, pl_module, evaluate=False)  # a validation per save would cost too much

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.export(trainer, pl_module)


def _check_sharded_export(module: Any, specs: list[object], merge_base: str) -> None:
    """Under FSDP2 the merge streams from the source files (no rank holds the whole model); refuse at setup what
    that cannot export."""
    reason = checkpoint_streaming_unavailable(module, {FINGERPRINT_KEY: None}, specs, merge_base)
    if reason is not None:
        raise ConfigError(
            "merge: under ModelParallelStrategy (FSDP2) MergeOnSaveCallback gathers the adapters and merges them "
            f"into the model's source files as they stream by, which cannot work here: {reason}. Fix: drop merge: "
            "and export the saved checkpoint afterwards in one process: lightning-adapt export --config <recipe> "
            "--ckpt_path <ckpt> --output <dir>."
        )
