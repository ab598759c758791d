"""Plain text for continued pretraining: documents tokenized, joined by EOS and packed into full rows.

:class:`TextDataModule` reads a ``source`` (:mod:`lightning_adapt.data.sources`), tokenizes each document once
(:func:`~lightning_adapt.data.tokenized.map_cached`: batched, cached by fingerprint) and serves the concatenation
of the documents, each followed by the tokenizer's EOS, cut into rows of exactly ``max_length`` tokens
(:class:`PackedRows`), every token a target. The rows are a view over the cached token table: a document longer
than a row continues in the next one, and nothing is truncated or copied into memory.
"""

from __future__ import annotations

import bisect
import itertools
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from typing_extensions import override

from lightning_adapt.data._common import SplitDataModule, load_tokenizer, tokenizer_source
from lightning_adapt.data.batching import IGNORE_INDEX, left_padded_prompts
from lightning_adapt.data.sources import column_names
from lightning_adapt.data.tokenized import bad_records_error, map_cached, tokenizer_key
from lightning_adapt.errors import DataError

__all__ = ["PackedRows", "TextDataModule"]


class PackedRows(Dataset[dict[str, list[int]]]):
    """Row ``r`` of the token stream of a tokenized table: its tokens ``[r·L, (r + 1)·L)``, ``L`` = ``max_length``.

    The stream is every document's ``input_ids`` in table order, each ending with the EOS the tokenizing function
    appended; the last row holds what is left (fewer than ``L`` tokens when the stream's length is not a multiple
    of ``L``: the collate pads it). Only the documents' end offsets are held in memory.

    >>> table = datasets.Dataset.from_dict({"input_ids": [[5, 6, 0], [7, 0]], "length": [3, 2]})
    >>> rows = PackedRows(table, max_length=2)
    >>> [rows[i]["input_ids"] for i in range(len(rows))]
    [[5, 6], [0, 7], [0]]
    """

    def __init__(self, table: Any, max_length: int) -> None:
        self.table = table
        self.max_length = max_length
        self.ends = list(itertools.accumulate(int(n) for n in table["length"]))
        total = self.ends[-1] if self.ends else 0
        self.rows = -(-total // max_length)

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        if not 0 <= index < self.rows:
            raise IndexError(index)
        start, stop = index * self.max_length, min((index + 1) * self.max_length, self.ends[-1])
        first = bisect.bisect_right(self.ends, start)  # the document holding token `start`
        last = bisect.bisect_left(self.ends, stop)  # the one holding token `stop - 1`
        offset = self.ends[first - 1] if first else 0
        ids = [t for doc in self.table[first : last + 1]["input_ids"] for t in doc]
        return {"input_ids": ids[start - offset : stop - offset]}


class TextDataModule(SplitDataModule):
    """Plain text for continued pretraining with :class:`~lightning_adapt.tasks.CausalLMTask`.

    Each document (a record's ``text_column``) is tokenized without special tokens and followed by the tokenizer's
    EOS; the documents are concatenated in table order and cut into rows of exactly ``max_length`` tokens: a
    document longer than a row continues in the next, and several short ones share a row. The last row of a split
    is kept, right-padded (padding has ``attention_mask`` 0 and label -100), so no token is lost. As in GPT-style
    pretraining (Hugging Face's ``run_clm`` ``group_texts``), attention inside a row spans the documents it holds:
    a document's tokens attend to the end of the one before, across the EOS.

    Batches hold ``input_ids``, ``attention_mask`` and ``labels``, shapes ``[batch_size, max_length]``; labels are
    the input ids (every token a target; the model shifts them). ``train_size`` and ``val_size`` count documents,
    held out before packing (:func:`~lightning_adapt.data.sources.train_val_tables`), so a document never trains
    and validates both. Prediction (``lightning-adapt predict``) continues text: each validation row's first half
    is the prompt and its second half the reference.
    """

    def __init__(
        self,
        source: str,
        tokenizer: str | None = None,
        split: str | None = None,
        subset: str | None = None,
        revision: str | None = None,
        val_source: str | None = None,
        val_split: str | None = None,
        text_column: str = "text",
        max_length: int = 512,
        batch_size: int = 8,
        train_size: int | None = None,
        val_size: int = 64,
        seed: int = 42,
        num_workers: int = 0,
        num_proc: int | None = None,
    ) -> None:
        """
        Args:
            source: the documents: a data file (``.jsonl``, ``.json``, ``.csv``, ``.tsv``, ``.parquet``, ``.txt``
                (one document a line), ``.arrow``), a folder of them, a ``save_to_disk`` folder or a Hub dataset
                id (:mod:`lightning_adapt.data.sources`).
            split: the split of ``source`` to train on (``None``: ``train``).
            subset: the configuration of a folder or Hub dataset that has several.
            revision: with a Hub id: the branch, tag or commit.
            val_source: validation documents from another source (its ``val_split``, else ``train``).
            val_split: the validation split (of ``val_source`` if set, else of ``source``); with neither,
                ``val_size`` documents are held out of the training split.
            text_column: the column holding each document's text.
            tokenizer: a packaged model name or a local Hugging Face directory with a tokenizer; ``None`` uses
                the model's (``model_name_or_path`` of the LightningModule being trained).
            max_length: tokens per row: documents are packed into rows of exactly this many (none is truncated).
            batch_size: rows per batch.
            train_size: training documents (``None``: all that remain after validation).
            val_size: documents held out for validation (before packing).
            seed: seed of the deterministic split (and of the per-epoch shuffle of the rows).
            num_workers: DataLoader worker processes.
            num_proc: processes that tokenize (``None``: this one).
        """
        super().__init__(tokenizer, max_length, batch_size, train_size, val_size, seed, num_workers)
        if num_proc is not None and num_proc < 1:
            raise DataError(f"data.num_proc={num_proc} must be >= 1. Fix: null (this process) or a process count.")
        self.save_hyperparameters()
        self.source, self.split, self.subset, self.revision = source, split, subset, revision
        self.val_source, self.val_split = val_source, val_split
        self.text_column = text_column
        self.num_proc = num_proc

    @override
    def setup(self, stage: str) -> None:
        if self._splits:
            return
        self.tokenizer = load_tokenizer(tokenizer_source(self), "data.tokenizer")
        if self.tokenizer.eos_token_id is None:
            raise DataError(
                f"data.tokenizer={self.tokenizer_name!r} has no EOS token to end each document with. Fix: use a "
                "tokenizer with an eos_token (a causal LM's)."
            )
        tables = self.source_tables(
            prepare=self._tokenize,
        )
        train, val = (PackedRows(table, self.max_length) for table in tables)
        self._splits = {"train": train, "val": val}  # type: ignore[dict-item]  # a view, read as the lists are

    def _tokenize(self, table: Any, source: str, setting: str) -> Any:
        """``table``'s documents as ``input_ids`` (each ending with EOS) and ``length`` (cached); a missing column
        or a record without text is refused, every one counted."""
        tokenizer, column, eos = self.tokenizer, self.text_column, self.tokenizer.eos_token_id
        if column not in (found := column_names(table)):
            raise DataError(
                f"data.text_column={column!r} is not a column of {source!r} (columns found: {', '.join(found)}). "
                "Fix: set data.text_column to the column that holds the documents' text."
            )

        def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
            problems = [_text_problem(value, column) for value in batch[column]]
            texts = [value if not problem else "" for value, problem in zip(batch[column], problems, strict=True)]
            ids = [[*doc, eos] for doc in tokenizer(texts, add_special_tokens=False)["input_ids"]]
            return {"input_ids": ids, "length": [len(doc) for doc in ids], "problem": problems}

        # max_length is not part of the key: the documents' tokens do not depend on it (PackedRows cuts the rows)
        key = ("text", tokenizer_key(tokenizer), column, eos)
        name = Path(source).name or source
        encoded = map_cached(
            table.select_columns([column]), encode, key=key, num_proc=self.num_proc, desc=f"tokenize {name}"
        )
        fix = f"give every record a non-empty string in its {column!r} column (data.text_column), or drop the others."
        if error := bad_records_error(encoded["problem"], source, setting, "documents", fix):
            raise error
        return encoded.remove_columns("problem")

    @override
    def collate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """``[len(rows), max_length]`` tensors; a short last row is right-padded (mask 0, label -100)."""
        ids = torch.full((len(rows), self.max_length), self.tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), self.max_length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), self.max_length), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[i, :n] = labels[i, :n] = torch.tensor(row["input_ids"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    @override
    def predict_collate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Left-padded prompts (each row's first half) with the ``prompt`` and ``reference`` (second half) texts."""
        decode = self.tokenizer.decode
        prompts = []
        for row in rows:
            ids = row["input_ids"]
            half = max(1, len(ids) // 2)
            prompts.append({"prompt_ids": ids[:half], "prompt": decode(ids[:half]), "reference": decode(ids[half:])})
        return left_padded_prompts(prompts, self.tokenizer.pad_token_id)


def _text_problem(value: Any, column: str) -> str:
    """Why ``value`` is not a document's text (``""``: it is one)."""
    if not isinstance(value, str):
        return f"{column!r} is {'missing' if value is None else 'a ' + type(value).__name__}, not a string"
    return "" if value.strip() else f"{column!r} is empty"
