"""The ``lightning-adapt`` command: LightningCLI with recipe keys for adapters, plus ``estimate``.

``lightning-adapt fit --config recipes/sentiment/qlora.yaml`` trains any LightningModule/DataModule named
under ``model:`` / ``data:``; the recipe's top-level keys (``quantize:``, ``lora:``, ``paged_optimizer:``,
``merge:``, ``memory_report:``) each add one callback, so the same module trains as full fine-tuning, LoRA
or QLoRA by configuration alone. ``lightning-adapt estimate`` plans memory without building a model.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

from lightning_adapt.data._common import DataError
from lightning_adapt.models import ModelNotFoundError

#: Top-level recipe keys and the callback class each one configures (``class_path``/``init_args``);
#: a key left out of the config adds nothing.
RECIPE_KEYS: dict[str, str] = {
    "quantize": "lightning_adapt.callbacks.quantize.QuantizeBaseCallback",
    "lora": "lightning_adapt.callbacks.lora.LoRAInjectionCallback",
    "paged_optimizer": "lightning_adapt.plugins.paged_optimizer.PagedOptimizerPlugin",
}


def _load_class(class_path: str) -> type[Callback]:
    module, _, name = class_path.rpartition(".")
    cls: type[Callback] = getattr(importlib.import_module(module), name)
    return cls


class AdaptCLI(LightningCLI):
    """LightningCLI whose parser also takes the optional recipe keys listed in ``RECIPE_KEYS``."""

    def __init__(self, args: list[str] | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("model_class", LightningModule)
        kwargs.setdefault("datamodule_class", LightningDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(args=args, **kwargs)

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
        from lightning_adapt.estimate_cli import main as estimate_main

        estimate_main(args[1:])
        return
    try:
        AdaptCLI(args=args)
    except (ModelNotFoundError, DataError, ValueError, ImportError) as err:
        if os.environ.get("LIGHTNING_ADAPT_DEBUG"):
            raise
        print(f"lightning-adapt: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
