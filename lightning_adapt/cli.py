"""The Lightning subcommands of ``lightning-adapt``: LightningCLI with recipe keys for adapters.

``lightning-adapt fit --config recipes/sentiment/qlora.yaml`` trains any LightningModule/DataModule named
under ``model:`` / ``data:``; the recipe's top-level keys (``quantize:``, ``lora:``, ``paged_optimizer:``,
``merge:``, ``memory_report:``) each add one callback, so the same module trains as full fine-tuning, LoRA
or QLoRA by configuration alone; ``fit_check: error | warn | off`` (default ``error``) checks before the base is read
that the run fits its device. The console script (:mod:`lightning_adapt.entry`) sends ``estimate``,
``inspect`` and ``compare`` elsewhere without importing this module (or Lightning).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Literal

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_adapt.adapters.checkpoint import FINGERPRINT_KEY
from lightning_adapt.callbacks._transform import build_model, transform_specs
from lightning_adapt.callbacks.atomic_checkpoint import install_atomic_checkpoint_io
from lightning_adapt.callbacks.fit_check import FitCheckCallback, FitMode
from lightning_adapt.callbacks.merge import MergeOnSaveCallback
from lightning_adapt.checks import (
    check_strategy,
    last_checkpoint,
    mesh_sizes,
    missing_roots,
    parser_error,
    quiet_libraries,
    read_checkpoint,
    remove_created,
)
from lightning_adapt.errors import CheckpointError, ConfigError, ExportError, setting_names
from lightning_adapt.export.exporter import check_target
from lightning_adapt.export.original import request_spill
from lightning_adapt.export.stream_export import checkpoint_streaming_unavailable

#: Top-level recipe keys and the callback class each one configures (``class_path``/``init_args``);
#: a key left out of the config adds nothing.
RECIPE_KEYS: dict[str, str] = {
    "quantize": "lightning_adapt.callbacks.quantize.QuantizeBaseCallback",
    "lora": "lightning_adapt.callbacks.lora.LoRAInjectionCallback",
    "paged_optimizer": "lightning_adapt.callbacks.paged_optimizer.PagedOptimizerPlugin",
    "memory_report": "lightning_adapt.callbacks.memory_report.MemoryReportCallback",
    "merge": "lightning_adapt.callbacks.merge.MergeOnSaveCallback",
    "shard": "lightning_adapt.callbacks.shard.FullyShardCallback",
    "predictions": "lightning_adapt.callbacks.predictions.PredictionWriter",
    "guard": "lightning_adapt.callbacks.nonfinite_guard.NonFiniteGuardCallback",
    "exact_resume": "lightning_adapt.callbacks.exact_resume.ExactResumeCallback",
}
FIT_CHECK_HELP = (
    "Before the base is read, estimate the run's weights, gradients, optimizer state and activations on its device: "
    "error refuses a run whose weights, gradients and optimizer state alone exceed the free memory (GPU memory, or "
    "the available RAM on CPU) by over 5%, naming the changes that would fit; warn only warns; off skips the check."
)
#: ``--ckpt_path`` values Lightning resolves itself (``last``: the newest checkpoint of the run's folder).
_SPECIAL_CKPT = ("last", "best", "hpc")


def _load_class(class_path: str) -> type[Callback]:
    module, _, name = class_path.rpartition(".")
    cls: type[Callback] = getattr(importlib.import_module(module), name)
    return cls


class AdaptTrainer(Trainer):
    """The Trainer of ``lightning-adapt``, with an ``export`` subcommand next to fit/validate/test/predict."""

    def export(
        self,
        model: LightningModule,
        ckpt_path: str,
        output: str,
        dtype: Literal["fp32", "bf16", "fp16"] | None = None,
        merge_base: Literal["original", "dequantized"] = "original",
        max_shard_size: str = "5GB",
        overwrite: bool = False,
        evaluate: bool = True,
        eval_batches: int | None = None,
        format: Literal["safetensors", "gguf"] = "safetensors",
        gguf_type: Literal["f32", "f16", "bf16", "q8_0"] = "f16",
        datamodule: LightningDataModule | None = None,
    ) -> None:
        """Write the PEFT-format adapter (output/adapter) and the merged model (output/merged) of a checkpoint.

        Args:
            model: the recipe's LightningModule (built from ``--config``).
            ckpt_path: the checkpoint to export (adapter-only or full), trained with the same recipe.
            output: target directory; must be absent or empty unless ``--overwrite true``.
            dtype: dtype of the merged weights (``fp32``, ``bf16``, ``fp16``); default: the base's own.
            merge_base: QLoRA: merge into the ``original`` full-precision weights re-read from the source
                model (best), or into the ``dequantized`` 4-bit weights. Both are compared in a report.
            max_shard_size: shard the merged weights above this size (e.g. ``5GB``, ``500MB``).
            overwrite: replace a non-empty ``output`` (atomically).
            evaluate: QLoRA with validation data: then validate the trained model and both merges and print each
                one's metrics and the better merge (``MergeOnSaveCallback``'s ``evaluate``); ``false``: skip it.
            eval_batches: validation batches per evaluated model; ``None``: the recipe's ``limit_val_batches``.
            format: ``safetensors`` (output/merged) or ``gguf``: output/gguf/model-<gguf_type>.gguf for llama.cpp,
                Ollama or LM Studio, and the adapters' GGUF where llama.cpp can apply them (Llama, Mistral, Qwen2).
            gguf_type: with ``--format gguf``: ``f32``, ``f16``, ``bf16`` or ``q8_0`` (8-bit) for the matrices.
            datamodule: the recipe's DataModule (its tokenizer is saved when the model has none; its validation
                data measures the merges).
        """
        with setting_names(target="--output", dirpath="--output", ckpt_path=f"--ckpt_path={ckpt_path!r}"):
            check_target(Path(output), overwrite)
            merge = MergeOnSaveCallback(
                output, merge_base, dtype, max_shard_size, overwrite=overwrite, evaluate=evaluate,
                eval_batches=eval_batches, format=format, gguf_type=gguf_type,
            )  # fmt: skip
            merge.measure_memory = merge.reports_memory(self)
            fix = " Fix: pass a checkpoint trained with this recipe (same model, quantize: and lora: settings)."
            state = read_checkpoint(ckpt_path)["state_dict"]  # mapped: a full checkpoint's base is never read in
            specs = transform_specs(self)
            reason = checkpoint_streaming_unavailable(model, state, specs, merge.options.merge_base)
            if reason is None:  # no model is built: the adapters are merged into the source files as they stream by
                merge.export_checkpoint(model, state, specs, datamodule)
                if not merge.evaluates(specs):
                    return  # else the trained model is built to measure the merges
            else:
                rank_zero_info(f"lightning-adapt: export builds the model and merges in memory: {reason}")
            with tempfile.TemporaryDirectory(prefix="lightning-adapt-originals-") as spill:
                request_spill(model, Path(spill))  # a model built in full precision: its originals, until exported
                build_model(self, model)
                try:
                    model.load_state_dict(state)
                except (KeyError, RuntimeError) as err:
                    raise ExportError(
                        f"--ckpt_path={ckpt_path!r} does not match the model built from --config: {err}"
                        f"{'' if 'Fix:' in str(err) else fix}"
                    ) from None
                if reason is not None:
                    merge.export(None, model, datamodule, evaluate=False)
                if merge.evaluates(specs):
                    merge.evaluate_merges(self, model, datamodule)
                request_spill(model, None)

    def chat(
        self,
        model: LightningModule,
        ckpt_path: str | None = None,
        prompt: str | None = None,
        system: str | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        datamodule: LightningDataModule | None = None,
    ) -> None:
        """Talk to a causal-LM recipe's model: one reply to ``--prompt``, else a loop over standard input.

        Args:
            model: the recipe's causal-LM task (built from ``--config``).
            ckpt_path: a checkpoint trained with the recipe (adapters on the base, 4-bit or not), or a merged
                directory (``<log dir>/export/merged``); none: the untrained base.
            prompt: answer this one message and exit; none: interactive (``/exit``, Ctrl-D or Ctrl-C leave).
            system: an optional system message put before the conversation.
            max_new_tokens: the longest reply, in tokens.
            temperature: 0 decodes greedily (deterministic); above 0 samples (e.g. 0.7).
            top_p: nucleus sampling: keep the smallest set of tokens whose probability reaches this.
            seed: seed of the sampler (sampling only).
            datamodule: the recipe's DataModule (unused; accepted so recipes load unchanged).
        """
        from lightning_adapt.chat import GenerationOptions, run_chat

        options = GenerationOptions(max_new_tokens, temperature, top_p, seed)
        hf_model, tokenizer = self._chat_model(model, ckpt_path)
        run_chat(hf_model, tokenizer, options, prompt, system)

    def _chat_model(self, model: LightningModule, ckpt_path: str | None) -> tuple[Any, Any]:
        tokenizer = getattr(model, "tokenizer", None)
        if tokenizer is None or not hasattr(model, "hf_config"):
            raise ConfigError(
                f"chat needs a causal-LM recipe; --config builds {type(model).__name__}. "
                "Fix: use a recipe under recipes/chat/ (model: lightning_adapt.tasks.CausalLMTask)."
            )
        if ckpt_path and Path(ckpt_path).is_dir():  # a merged export: plain from_pretrained
            from transformers import AutoModelForCausalLM, AutoTokenizer

            try:
                hf = AutoModelForCausalLM.from_pretrained(ckpt_path, local_files_only=True, trust_remote_code=False)
            except (OSError, ValueError) as err:
                raise ConfigError(
                    f"--ckpt_path={ckpt_path!r} is a directory but not a saved model ({err}). "
                    "Fix: pass <log dir>/export/merged or a .ckpt file."
                ) from None
            if (Path(ckpt_path) / "tokenizer_config.json").is_file():
                tokenizer = AutoTokenizer.from_pretrained(ckpt_path, local_files_only=True, trust_remote_code=False)
            return hf, tokenizer
        build_model(self, model)
        if ckpt_path:
            state = read_checkpoint(ckpt_path)["state_dict"]
            try:
                model.load_state_dict(state)
            except (KeyError, RuntimeError) as err:
                raise ConfigError(
                    f"--ckpt_path={ckpt_path!r} is not a checkpoint of this recipe: {err}. "
                    "Fix: pass a .ckpt trained with the same --config, or a merged directory."
                ) from None
        return model.model, tokenizer  # type: ignore[attr-defined]


class AdaptCLI(LightningCLI):
    """LightningCLI whose parser also takes the optional recipe keys listed in ``RECIPE_KEYS``."""

    def __init__(self, args: list[str] | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("model_class", LightningModule)
        kwargs.setdefault("datamodule_class", LightningDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("trainer_class", AdaptTrainer)
        super().__init__(args=args, **kwargs)

    @staticmethod
    @override
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "export": {"model", "datamodule"}, "chat": {"model", "datamodule"}}

    @override
    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        # The parser's own report (usage, then every union member's error) becomes one ArgumentError line.
        for each in (parser, *getattr(self, "_subcommand_parsers", {}).values()):
            each.exit_on_error = False
        try:
            super().parse_arguments(parser, args)
        except argparse.ArgumentError as err:
            words = sys.argv[1:] if args is None else [str(a) for a in args]
            subcommand = next((w for w in words if w in self.subcommands()), None)
            raise parser_error(str(err), subcommand) from None

    @override
    def _parse_ckpt_path(self) -> None:
        # Every --ckpt_path is opened once, safely, before anything is built or written (checks.read_checkpoint).
        # LightningCLI re-reads the model's hyperparameters from the checkpoint; a checkpoint saved outside
        # the CLI has no class path for them (subclass mode), so keep the config's model settings instead.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path == "best":  # Lightning's "best" of an earlier fit in the same process: a CLI run has none
            raise CheckpointError(
                f"--ckpt_path='best' means the best checkpoint of a fit run earlier in the same process; "
                f"`lightning-adapt {subcommand}` starts a new one, which has none. Fix: pass the checkpoint file "
                "(<log dir>/checkpoints/*.ckpt), or 'last' to resume a fit."
            )
        special = ckpt_path in _SPECIAL_CKPT or str(ckpt_path).startswith("registry")
        if not ckpt_path or special or (subcommand == "chat" and Path(ckpt_path).is_dir()):
            return
        checkpoint = read_checkpoint(ckpt_path)
        adapter_keys = [key for key in ("lora", "quantize") if self.config[subcommand].get(key) is not None]
        if not adapter_keys and FINGERPRINT_KEY in checkpoint["state_dict"]:
            raise CheckpointError(
                f"--ckpt_path={ckpt_path!r} is adapter-only (trained with lora: or quantize:; it holds no base "
                "weights), but --config has neither key. Fix: pass the recipe it was trained with."
            )
        hparams = checkpoint.get("hyper_parameters") or {}
        if hparams and "_class_path" not in hparams:
            return
        try:
            super()._parse_ckpt_path()
        except argparse.ArgumentError as err:
            raise parser_error(f"--ckpt_path={ckpt_path!r}: its saved hyperparameters: {err}", subcommand) from None

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for key, class_path in RECIPE_KEYS.items():
            parser.add_lightning_class_args(_load_class(class_path), key, subclass_mode=True, required=False)
        # a plain value, on unless turned off: every fit is checked before its base is read (callbacks/fit_check.py)
        parser.add_argument("--fit_check", type=FitMode, default="error", help=FIT_CHECK_HELP)

    @override
    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        # Recipe keys left out of the config are None: they add no callback.
        keys = self._parser(self.subcommand).callback_keys
        extra = [cb for cb in (self._get(self.config_init, k) for k in keys) if cb is not None]
        if (mode := self._get(self.config_init, "fit_check", default="error")) != "off":
            extra.append(FitCheckCallback(mode))
        trainer_config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        try:
            trainer = self._instantiate_trainer(trainer_config, extra)
        except (MisconfigurationException, ValueError) as err:  # Lightning's checks of the trainer: settings
            if isinstance(err, ConfigError):
                raise
            raise ConfigError(
                f"trainer: {str(err).strip()} Fix: change that trainer setting; "
                f"`lightning-adapt {self.subcommand} --help` lists them."
            ) from None
        install_atomic_checkpoint_io(trainer)  # full fine-tuning too: no half-written last.ckpt after a kill
        _resolve_mesh(trainer)
        return trainer

    @override
    def _run_subcommand(self, subcommand: str) -> None:
        # A run refused by a configuration error leaves nothing behind: the folders it created (the logger's
        # version folder with config.yaml, the checkpoint folder) go, unless it trained (then they are kept).
        roots = missing_roots(_output_dirs(self.trainer))
        try:
            if self.config_init[subcommand].get("ckpt_path") == "last":
                path = last_checkpoint(_checkpoint_folders(self.trainer))
                read_checkpoint(path)  # opened safely first, as every --ckpt_path is
                rank_zero_info(f"lightning-adapt: --ckpt_path last: resuming from {path}")
                self.config_init[subcommand]["ckpt_path"] = str(path)
            super()._run_subcommand(subcommand)
        except Exception as err:
            if _config_error(err) is not None and self.trainer.global_step == 0:
                remove_created(roots)
            raise

    @override
    def before_instantiate_classes(self) -> None:
        strategy = self._get(self.config, "trainer", default={}).get("strategy")
        name = strategy.get("class_path", "") if hasattr(strategy, "get") else str(strategy or "")
        check_strategy(name, [key for key in RECIPE_KEYS if self._get(self.config, key) is not None])


class _ParseOnly(AdaptCLI):
    """The ``fit`` parser and its checks (``before_instantiate_classes``), building and seeding nothing."""

    @override
    def _set_seed(self) -> None:
        return None

    @override
    def instantiate_classes(self) -> None:
        return None


def check_fit_arguments(args: list[str], where: str) -> None:
    """Parse ``fit``'s ``args`` (no subcommand) as the CLI would, without building a model, data or trainer;
    raises :class:`ConfigError` with the parser's one line, prefixed by ``where`` (what the user passed)."""
    quiet_libraries()  # compare parses each recipe's options here (LightningCLI warns: args and sys.argv given)
    try:
        _ParseOnly(args=args, run=False)
    except (argparse.ArgumentError, ConfigError) as err:
        raise ConfigError(f"{where}: {err}") from None


def _resolve_mesh(trainer: Trainer) -> None:
    """ModelParallelStrategy: a size left ``auto`` becomes what ``--trainer.devices`` x ``num_nodes`` leaves it (each
    rank that Lightning's launcher starts re-runs the CLI and derives the same), or one error line before launch."""
    strategy = trainer.strategy
    if isinstance(strategy, ModelParallelStrategy):
        devices = len(strategy.parallel_devices or ())
        sizes = mesh_sizes(strategy._data_parallel_size, strategy._tensor_parallel_size, devices, strategy.num_nodes)
        strategy._data_parallel_size, strategy._tensor_parallel_size = sizes


def _checkpoint_folders(trainer: Trainer) -> list[Path]:
    """Where earlier runs of this recipe saved checkpoints: each ModelCheckpoint's own ``dirpath``, else the
    ``checkpoints`` folder of every version folder of each logger (no logger: ``default_root_dir``)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    callbacks = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)]
    folders = [Path(cb.dirpath) for cb in callbacks if cb.dirpath]
    if any(cb.dirpath is None for cb in callbacks):
        roots = [getattr(logger, "root_dir", None) or logger.save_dir for logger in trainer.loggers]
        for root in [Path(r) for r in roots if r] or [Path(trainer.default_root_dir)]:
            folders += [root / "checkpoints", *(v / "checkpoints" for v in root.glob("*") if v.is_dir())]
    return folders


def _output_dirs(trainer: Trainer) -> list[str | None]:
    dirs: list[str | None] = [getattr(cb, "dirpath", None) for cb in trainer.checkpoint_callbacks]
    for logger in trainer.loggers:
        try:  # resolves the next version folder without creating it
            dirs.append(logger.log_dir)
        except Exception:  # a logger without a local folder
            continue
    return dirs


def main(argv: list[str] | None = None) -> None:
    """The Lightning subcommands of ``lightning-adapt`` (the console script is :func:`lightning_adapt.entry.main`,
    which also runs ``estimate``, ``inspect`` and ``compare``)."""
    quiet_libraries()
    try:
        AdaptCLI(args=argv)  # None: LightningCLI reads sys.argv itself
    except ValueError as err:
        config_error = _config_error(err)
        if config_error is None or os.environ.get("LIGHTNING_ADAPT_DEBUG"):
            raise  # not a setting the user can fix: keep the traceback
        print(f"lightning-adapt: error: {config_error}", file=sys.stderr)
        raise SystemExit(2) from None


def _config_error(err: BaseException) -> ConfigError | None:
    """The :class:`ConfigError` that ``err`` is or wraps (the config parser wraps a class's own error in its
    union-type report), else ``None``."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, ConfigError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


if __name__ == "__main__":
    main()
