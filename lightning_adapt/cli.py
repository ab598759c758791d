"""The ``lightning-adapt`` command: LightningCLI with recipe keys for adapters, plus ``estimate``.

``lightning-adapt fit --config recipes/sentiment/qlora.yaml`` trains any LightningModule/DataModule named
under ``model:`` / ``data:``; the recipe's top-level keys (``quantize:``, ``lora:``, ``paged_optimizer:``,
``merge:``, ``memory_report:``) each add one callback, so the same module trains as full fine-tuning, LoRA
or QLoRA by configuration alone. ``lightning-adapt estimate`` plans memory without building a model.
"""

from __future__ import annotations

import importlib
import os
import pickle
import sys
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_adapt.callbacks._transform import build_model, transform_specs
from lightning_adapt.callbacks.merge import MergeOnSaveCallback, checkpoint_streaming_unavailable
from lightning_adapt.errors import ConfigError, ExportError
from lightning_adapt.export.exporter import check_target
from lightning_adapt.memory.cli import main as estimate_main

#: Top-level recipe keys and the callback class each one configures (``class_path``/``init_args``);
#: a key left out of the config adds nothing.
RECIPE_KEYS: dict[str, str] = {
    "quantize": "lightning_adapt.callbacks.quantize.QuantizeBaseCallback",
    "lora": "lightning_adapt.callbacks.lora.LoRAInjectionCallback",
    "paged_optimizer": "lightning_adapt.callbacks.paged_optimizer.PagedOptimizerCallback",
    "memory_report": "lightning_adapt.callbacks.memory_report.MemoryReportCallback",
    "merge": "lightning_adapt.callbacks.merge.MergeOnSaveCallback",
    "shard": "lightning_adapt.callbacks.shard.FullyShardCallback",
    "predictions": "lightning_adapt.callbacks.predictions.PredictionWriter",
}


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
            datamodule: the recipe's DataModule (its tokenizer is saved when the model has none).
        """
        check_target(Path(output), overwrite, "--output")
        merge = MergeOnSaveCallback(output, merge_base, dtype, max_shard_size, overwrite=overwrite)
        merge.argument = "--output"
        fix = " Fix: pass a checkpoint trained with this recipe (same model, quantize: and lora: settings)."
        try:  # mapped: a full checkpoint's frozen base is never read in
            state = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)["state_dict"]
        except (OSError, KeyError, RuntimeError, pickle.UnpicklingError) as err:
            raise ExportError(
                f"--ckpt_path={ckpt_path!r} is not a readable Lightning checkpoint: {err}.{fix}"
            ) from None
        specs = transform_specs(self)
        reason = checkpoint_streaming_unavailable(model, state, specs, merge_base)
        if reason is None:  # no model is built: the adapters are merged into the source files as they stream by
            merge.export_checkpoint(model, state, specs, datamodule, f"--ckpt_path={ckpt_path!r}")
            return
        rank_zero_info(f"lightning-adapt: export builds the model and merges in memory: {reason}")
        build_model(self, model)
        try:
            model.load_state_dict(state)
        except (KeyError, RuntimeError) as err:
            raise ExportError(
                f"--ckpt_path={ckpt_path!r} does not match the model built from --config: {err}"
                f"{'' if 'Fix:' in str(err) else fix}"
            ) from None
        merge.export(None, model, datamodule)

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
                hf = AutoModelForCausalLM.from_pretrained(ckpt_path, local_files_only=True)
            except (OSError, ValueError) as err:
                raise ConfigError(
                    f"--ckpt_path={ckpt_path!r} is a directory but not a saved model ({err}). "
                    "Fix: pass <log dir>/export/merged or a .ckpt file."
                ) from None
            if (Path(ckpt_path) / "tokenizer_config.json").is_file():
                tokenizer = AutoTokenizer.from_pretrained(ckpt_path, local_files_only=True)
            return hf, tokenizer
        build_model(self, model)
        if ckpt_path:
            try:
                state = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)["state_dict"]
                model.load_state_dict(state)
            except (OSError, KeyError, RuntimeError, pickle.UnpicklingError) as err:
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
    def _parse_ckpt_path(self) -> None:
        # LightningCLI re-reads the model's hyperparameters from the checkpoint; a checkpoint saved outside
        # the CLI has no class path for them (subclass mode), so keep the config's model settings instead.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and Path(ckpt_path).is_file():
            checkpoint = torch.load(ckpt_path, weights_only=True, map_location="cpu", mmap=True)
            hparams = checkpoint.get("hyper_parameters") or {}
            if hparams and "_class_path" not in hparams:
                return
        super()._parse_ckpt_path()

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for key, class_path in RECIPE_KEYS.items():
            parser.add_lightning_class_args(_load_class(class_path), key, subclass_mode=True, required=False)

    @override
    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        # Recipe keys left out of the config are None: they add no callback.
        keys = self._parser(self.subcommand).callback_keys
        extra = [cb for cb in (self._get(self.config_init, k) for k in keys) if cb is not None]
        trainer_config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        return self._instantiate_trainer(trainer_config, extra)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``lightning-adapt`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "estimate":
        estimate_main(args[1:])
        return
    if args and args[0] == "inspect":
        _inspect(args[1:])
        return
    try:
        AdaptCLI(args=argv)  # None: LightningCLI reads sys.argv itself
    except ValueError as err:
        config_error = _config_error(err)
        if config_error is None or os.environ.get("LIGHTNING_ADAPT_DEBUG"):
            raise  # not a setting the user can fix: keep the traceback
        print(f"lightning-adapt: error: {config_error}", file=sys.stderr)
        raise SystemExit(2) from None


def _inspect(args: list[str]) -> None:
    """``lightning-adapt inspect``: rank diagnostics of a trained adapter (imported only when asked for)."""
    from lightning_adapt.compare.inspect import main as inspect_main

    inspect_main(args)


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
