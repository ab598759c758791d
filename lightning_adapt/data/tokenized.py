"""Tokenization through ``datasets.map``: batched, in ``num_proc`` processes, cached on disk by fingerprint.

:func:`map_cached` runs a batched function over a table once and keeps the result as an Arrow file under
``$HF_DATASETS_CACHE/lightning_adapt/<fingerprint>.arrow``; a later run of the same recipe finds the file and
memory-maps it instead of tokenizing again. The fingerprint is computed here, not left to ``datasets``' hashing of
the function's closure (which a tokenizer can make unstable): it joins the source table's own fingerprint (the data
file's path, size and modification time, or its rows), the tokenizer (:func:`tokenizer_key`: its whole
specification and chat template), every setting the function reads (``key``) and this package's encoding code, so
any change to one of them tokenizes again. A streamed table is mapped lazily, as it is read (no cache).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, overload

from lightning.pytorch.utilities import rank_zero_info

from lightning_adapt.errors import SETTING, DataError

__all__ = ["Rows", "bad_records_error", "map_cached", "tokenizer_key"]

_SHOWN = 3  # bad records quoted in an error (all are counted)


def bad_records_error(problems: list[str], source: str, setting: str, what: str, fix: str) -> DataError | None:
    """One :class:`DataError` for the records whose ``problems`` entry is not empty (numbered from 1 in the
    source's order; the first few quoted, all counted), or ``None`` when there are none."""
    bad = [(number, p) for number, p in enumerate(problems, start=1) if p]
    if not bad:
        return None
    shown = "; ".join(f"record {number}: {p}" for number, p in bad[:_SHOWN])
    more = f"; and {len(bad) - _SHOWN} more" if len(bad) > _SHOWN else ""
    return DataError(
        f"{SETTING}={source!r}: {len(bad)} of {len(problems)} records are not {what} ({shown}{more}). Fix: {fix}",
        setting=setting,
    )


def tokenizer_key(tokenizer: Any) -> str:
    """A digest of everything that decides how ``tokenizer`` encodes text (vocabulary, normalizer, template)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps(
        [getattr(tokenizer, "chat_template", None), str(tokenizer.special_tokens_map), type(tokenizer).__name__],
        default=str,
    )
    return hashlib.sha256((spec + extra).encode()).hexdigest()[:20]


def _code_digest() -> str:
    """A digest of every module of this folder: the encoding functions and everything they call live here, so a
    change to any of them tokenizes again (a new release's cache is never read as the old one's)."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def map_cached(
    table: Any,
    function: Callable[[dict[str, list[Any]]], dict[str, list[Any]]],
    *,
    key: tuple[Any, ...],
    num_proc: int | None,
    desc: str,
) -> Any:
    """``function`` over ``table`` in batches; the input columns are replaced by what it returns.

    Args:
        table: a ``datasets.Dataset`` (cached result) or ``IterableDataset`` (mapped as it is read).
        function: columns of a batch of records -> columns of as many (or more, or fewer) output rows.
        key: every setting ``function`` depends on besides the table (tokenizer key, ``max_length``, format...).
        num_proc: processes for the map (``None``: this one).
        desc: the progress bar's label.
    """
    import datasets

    columns = table.column_names  # None for a stream that has not read its first record
    if isinstance(table, datasets.IterableDataset):
        return table.map(function, batched=True, remove_columns=columns)
    parts = json.dumps([table._fingerprint, _code_digest(), *key], default=str)
    fingerprint = hashlib.sha256(parts.encode()).hexdigest()[:32]
    cache = Path(datasets.config.HF_DATASETS_CACHE) / "lightning_adapt"
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"{fingerprint}.arrow"
    cached = target.is_file() or any(cache.glob(f"{fingerprint}_*_of_*.arrow"))
    start = time.perf_counter()
    mapped = table.map(
        function,
        batched=True,
        num_proc=num_proc if num_proc and num_proc > 1 else None,
        remove_columns=columns,
        new_fingerprint=fingerprint,
        cache_file_name=str(target),
        load_from_cache_file=True,
        desc=desc,
    )
    how = "reused from the cache" if cached else "tokenized and cached"
    rank_zero_info(
        f"lightning-adapt: {desc}: {len(mapped)} rows {how} in {time.perf_counter() - start:.2f}s ({target})"
    )
    return mapped


class Rows(Sequence[dict[str, Any]]):
    """A tokenized ``datasets.Dataset`` as the ready DataModules' list of rows: indexed rows (memory-mapped, not
    copied into Python lists), slices and ``+`` as lists, and ``lengths`` read from its ``length`` column."""

    def __init__(self, table: Any) -> None:
        self.table = table

    def __len__(self) -> int:
        return len(self.table)

    @overload
    def __getitem__(self, index: int) -> dict[str, Any]: ...
    @overload
    def __getitem__(self, index: slice) -> list[dict[str, Any]]: ...
    def __getitem__(self, index: int | slice) -> dict[str, Any] | list[dict[str, Any]]:
        if isinstance(index, slice):
            return [self.table[i] for i in range(*index.indices(len(self)))]
        row: dict[str, Any] = self.table[index]
        return row

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        """A DataLoader's batch of rows in one read."""
        batch = self.table[indices]
        return [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.table)

    def __add__(self, other: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        return [*self, *other]

    @property
    def lengths(self) -> list[int]:
        """The tokens of every row."""
        return list(self.table["length"])
