"""Where a ready DataModule's examples come from: one ``source`` string, read through Hugging Face ``datasets``.

``source`` is one of

* a data file: ``.jsonl`` / ``.json`` (JSON Lines or one JSON array), ``.csv``, ``.tsv``, ``.parquet``,
  ``.txt`` (one example a line, column ``text``) or ``.arrow``;
* a folder of such files (``datasets`` names the splits from the file names: ``train.jsonl``, ``test.csv``, ...;
  a README with ``configs:`` metadata gives the ``subset`` names), or a folder written by
  ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``;
* a Hugging Face Hub dataset id (``org/name``): resolved to its local snapshot with
  :func:`~lightning_adapt.hub.resolve_hub` (downloaded once unless ``HF_HUB_OFFLINE=1``), then read as a folder.

:func:`load_table` returns one split as a :class:`datasets.Dataset` (memory-mapped Arrow: larger than memory is
fine, nothing is copied) or, with ``streaming=True``, a :class:`datasets.IterableDataset`. Every problem (no such
file, an extension it does not read, an empty file, malformed JSON lines with their line numbers, a split or
subset that does not exist) is one :class:`~lightning_adapt.errors.DataError` naming the setting.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lightning_adapt.errors import SETTING, DataError
from lightning_adapt.hub import is_hub_id, resolve_hub

__all__ = ["BUILDERS", "column_names", "load_table", "split_indices", "train_val_tables"]

#: File extension -> (the ``datasets`` builder, its options).
BUILDERS: dict[str, tuple[str, dict[str, Any]]] = {
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"sep": "\t"}),
    ".parquet": ("parquet", {}),
    ".txt": ("text", {}),
    ".arrow": ("arrow", {}),
}
_SHOWN = 3  # bad lines quoted in an error (all are counted)


def load_table(
    source: str,
    *,
    split: str | None,
    subset: str | None = None,
    revision: str | None = None,
    streaming: bool = False,
    setting: str = "data.source",
    encoding: str | None = None,
    split_setting: str = "data.split",
) -> Any:
    """One split of ``source`` (see the module docstring) as a ``datasets`` table.

    Args:
        source: a data file, a folder of them, a ``save_to_disk`` folder or a Hub dataset id.
        split: the split to read; ``None``: ``train``.
        subset: the configuration (``name`` in ``datasets.load_dataset``) of a folder or Hub dataset that has several.
        revision: with a Hub id: the branch, tag or commit sha.
        streaming: an :class:`~datasets.IterableDataset` read as it is iterated (data larger than memory).
        setting: the name errors give ``source``.
        split_setting: the name errors give ``split``.
        encoding: the text encoding of CSV / TSV / text files (``None``: UTF-8).

    Raises:
        DataError: see the module docstring; ``ModelNotFoundError`` for a Hub id that cannot be resolved.
    """
    split = split or "train"
    path = Path(source).expanduser()
    if path.is_file():
        return _load_file(path, source, (split, split_setting), streaming, setting, encoding)
    if path.is_dir():
        return _load_folder(path, source, (split, split_setting), subset, streaming, setting)
    if is_hub_id(source):
        folder = resolve_hub(source, repo_type="dataset", revision=revision, setting=setting)
        return _load_folder(folder, source, (split, split_setting), subset, streaming, setting)
    raise DataError(
        f"{SETTING}={source!r} is not an existing file or folder, nor a Hub dataset id (org/name). Fix: point "
        f"{SETTING} at a data file ({', '.join(BUILDERS)}), a folder of them, a save_to_disk folder or a Hub dataset.",
        setting=setting,
    )


def train_val_tables(
    source: str,
    *,
    split: str | None,
    subset: str | None,
    revision: str | None,
    val_source: str | None,
    val_split: str | None,
    val_size: int,
    train_size: int | None,
    seed: int,
    streaming: bool = False,
    encoding: str | None = None,
    prepare: Callable[[Any, str, str], Any] | None = None,
) -> tuple[Any, Any]:
    """The training and validation tables of a DataModule's ``source`` settings.

    Validation comes from ``val_source`` (its ``val_split``, else ``train``), else from ``val_split`` of ``source``,
    else ``val_size`` examples held out of the training split: a seeded shuffle
    (:func:`split_indices`), or with ``streaming`` the stream's first ``val_size``
    records. ``train_size`` keeps that many training examples (``None``: all). ``prepare(table, source, setting)``,
    where given, maps each table as it is loaded, before the split (tokenize the whole split once, so that its cache
    serves any ``val_size`` and its errors count records in the source's own order).
    """
    common: dict[str, Any] = {"subset": subset, "revision": revision, "streaming": streaming, "encoding": encoding}

    def load(name: str, which: str | None, setting: str, split_setting: str = "data.split") -> Any:
        table = load_table(name, split=which, setting=setting, split_setting=split_setting, **common)
        return prepare(table, name, setting) if prepare is not None else table

    train = load(source, split, "data.source")
    if val_source is not None or val_split is not None:
        setting = "data.val_source" if val_source is not None else "data.source"
        val = load(val_source or source, val_split, setting, "data.val_split")
        if train_size is not None:
            train = train.take(train_size) if streaming else train.select(range(min(train_size, len(train))))
        _check_rows(train, source, "data.source")
        _check_rows(val, val_source or source, setting)
        return train, val
    if streaming:
        val, rest = train.take(val_size), train.skip(val_size)
        return (rest.take(train_size) if train_size is not None else rest), val
    _check_rows(train, source, "data.source")
    train_idx, val_idx = split_indices(len(train), val_size, train_size, seed)
    return train.select(train_idx), train.select(val_idx)


def split_indices(n: int, val_size: int, train_size: int | None, seed: int) -> tuple[list[int], list[int]]:
    """A deterministic shuffled split: the first ``val_size`` items validate, the next ``train_size`` train."""
    if val_size >= n:
        raise DataError(f"data.val_size={val_size} leaves no training data out of {n} examples. Fix: lower it.")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    val = order[:val_size]
    rest = order[val_size:]
    return rest[: train_size if train_size is not None else len(rest)], val


def _check_rows(table: Any, source: str, setting: str) -> None:
    if hasattr(table, "__len__") and len(table) == 0:
        raise DataError(
            f"{SETTING}={source!r} holds no examples. Fix: point {SETTING} at data with at least one record.",
            setting=setting,
        )


def column_names(table: Any) -> list[str]:
    """The columns of a ``datasets`` table (a streamed one may not know them before its first record)."""
    names = getattr(table, "column_names", None)
    if names is None:
        names = list(next(iter(table)).keys())
    return list(names)


def _load_file(
    path: Path, source: str, split_named: tuple[str, str], streaming: bool, setting: str, encoding: str | None
) -> Any:
    import datasets

    split, split_setting = split_named
    suffix = path.suffix.lower()
    if suffix not in BUILDERS:
        raise DataError(
            f"{SETTING}={source!r}: files ending in {suffix or '(no extension)'!r} are not read; allowed: "
            f"{', '.join(BUILDERS)}. Fix: convert the file to one of them (JSON Lines is the usual choice).",
            setting=setting,
        )
    if split != "train":
        raise DataError(
            f"{split_setting}={split!r}: {source!r} is a single file, whose one split is 'train'. Fix: leave "
            f"{split_setting} out, or point the source at a folder or Hub dataset that has that split.",
            setting=setting,
        )
    _check_not_empty(path, source, setting)
    if suffix == ".jsonl" or (suffix == ".json" and _first_char(path) != "["):
        _check_json_lines(path, source, setting)
    builder, options = BUILDERS[suffix]
    if encoding is not None and builder in ("csv", "text"):
        options = {**options, "encoding": encoding}
    try:
        return datasets.load_dataset(
            builder, data_files={"train": [str(path)]}, split="train", streaming=streaming, **options
        )
    except (datasets.exceptions.DatasetGenerationError, ValueError, OSError) as err:
        cause = err.__cause__ or err
        if "corresponds to no data" in str(err):  # a header and no rows
            raise DataError(
                f"{SETTING}={source!r} holds no examples. Fix: point {SETTING} at a file that holds examples.",
                setting=setting,
            ) from None
        raise DataError(
            f"{SETTING}={source!r} could not be read as {builder} ({_first_line(cause)}). Fix: check that the file "
            f"is valid {builder} with the same columns in every row.",
            setting=setting,
        ) from None


def _load_folder(
    folder: Path, source: str, split_named: tuple[str, str], subset: str | None, streaming: bool, setting: str
) -> Any:
    import datasets

    split, split_setting = split_named
    if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
        return _load_saved(folder, source, split_named, streaming, setting)
    try:
        return datasets.load_dataset(str(folder), name=subset, split=split, streaming=streaming)
    except ValueError as err:
        text = str(err)
        if "Unknown split" in text:
            raise DataError(
                f"{split_setting}={split!r} is not a split of {source!r} ({_first_line(err)}). Fix: set {split_setting} "
                "to one of those.",
                setting=setting,
            ) from None
        if "Config name is missing" in text or "BuilderConfig" in text:
            available = text[text.index("[") : text.index("]") + 1] if "[" in text else "see its README"
            raise DataError(
                f"data.subset={subset!r}: {source!r} has the subsets {available}. Fix: set data.subset to one of them.",
                setting=setting,
            ) from None
        raise _unreadable_folder(source, err, setting) from None
    except (FileNotFoundError, datasets.exceptions.DatasetGenerationError, OSError) as err:
        raise _unreadable_folder(source, err, setting) from None


def _load_saved(folder: Path, source: str, split_named: tuple[str, str], streaming: bool, setting: str) -> Any:
    import datasets

    split, split_setting = split_named
    saved = datasets.load_from_disk(str(folder))
    if isinstance(saved, datasets.DatasetDict):
        if split not in saved:
            raise DataError(
                f"{split_setting}={split!r} is not a split of {source!r} (it has {sorted(saved)}). Fix: set "
                f"{split_setting} to one of those.",
                setting=setting,
            )
        saved = saved[split]
    elif split != "train":
        raise DataError(
            f"{split_setting}={split!r}: {source!r} is one saved Dataset, with no splits. Fix: leave {split_setting} out.",
            setting=setting,
        )
    return saved.to_iterable_dataset() if streaming else saved


def _unreadable_folder(source: str, err: BaseException, setting: str) -> DataError:
    return DataError(
        f"{SETTING}={source!r}: no data could be read from the folder ({_first_line(err.__cause__ or err)}). Fix: put "
        f"data files ({', '.join(BUILDERS)}) in it, named by split (train.jsonl, test.jsonl), or save a dataset "
        "there with save_to_disk.",
        setting=setting,
    )


def _check_not_empty(path: Path, source: str, setting: str) -> None:
    with path.open("rb") as f:
        head = f.read(4096)
    if not head.strip():
        raise DataError(
            f"{SETTING}={source!r} is empty. Fix: point {SETTING} at a file that holds examples.", setting=setting
        )


def _first_char(path: Path) -> str:
    with path.open("rb") as f:
        return f.read(4096).lstrip()[:1].decode("latin-1")


def _check_json_lines(path: Path, source: str, setting: str) -> None:
    """Every line of a JSON Lines file is one JSON object: the bad ones are counted and the first few named."""
    bad: list[str] = []
    with path.open(encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                bad.append(f"line {number}: {err.msg} at column {err.colno}")
                continue
            if not isinstance(record, dict):
                bad.append(f"line {number}: a JSON {type(record).__name__}, not an object")
    if bad:
        shown = "; ".join(bad[:_SHOWN]) + (f"; and {len(bad) - _SHOWN} more" if len(bad) > _SHOWN else "")
        raise DataError(
            f"{SETTING}={source!r}: {len(bad)} line{'s' if len(bad) > 1 else ''} of {path.name} "
            f"{'are' if len(bad) > 1 else 'is'} not a JSON object ({shown}). Fix: one JSON object a line.",
            setting=setting,
        )


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0].rstrip(".") if text else type(err).__name__
