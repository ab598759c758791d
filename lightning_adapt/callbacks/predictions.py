"""Keep what ``predict`` produced: every prediction as one JSON line, and a short table of the first ones."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from typing_extensions import override

from lightning_adapt.atomic import atomic_file
from lightning_adapt.errors import ConfigError


class PredictionWriter(BasePredictionWriter):
    """Write every prediction of ``predict`` to a JSON Lines file and print the first few as a table.

    A batch's prediction is a list of dicts (one per example, as the packaged tasks return) or a tensor
    (one line per row). Label ids are named with the DataModule's ``labels`` when it has them. The file is
    written to a hidden temp file of its own beside the target (``lightning_adapt.atomic.atomic_file``) and
    moved into place at the end, so a crash leaves the previous ``predictions.jsonl`` or none, and two runs
    writing one file never share a temp. Under several processes each rank writes its own file.
    """

    def __init__(self, output: str | None = None, show: int = 5, max_width: int = 48) -> None:
        """
        Args:
            output: the JSON Lines file; default: ``predictions.jsonl`` in the run's log directory.
            show: how many of the first predictions to print as a table (0: none).
            max_width: longest cell of the printed table, in characters (longer ones are cut with ``…``).
        """
        for name, value, least in (("show", show, 0), ("max_width", max_width, 8)):
            if value < least:
                raise ConfigError(
                    f"predictions.{name}={value} must be >= {least}. Fix: predictions.{name}={5 if name == 'show' else 48}."
                )
        super().__init__(write_interval="batch")
        self.output = output
        self.show = show
        self.max_width = max_width
        self.path: Path | None = None
        self._file: Any = None
        self._commit: contextlib.ExitStack | None = None  # the open atomic_file: closed on success, else unwound
        self._first: list[dict[str, Any]] = []
        self._count = 0

    def _target(self, trainer: Trainer) -> Path:
        if self.output is not None:
            path = Path(self.output)
        else:
            path = Path(trainer.log_dir or trainer.default_root_dir) / "predictions.jsonl"
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}-rank{trainer.global_rank}{path.suffix}")
        return path

    @override
    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.path = self._target(trainer)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._commit = contextlib.ExitStack()
        self._file = self._commit.enter_context(atomic_file(self.path))
        self._first, self._count = [], 0

    @override
    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        labels = getattr(datamodule, "labels", None)
        for row in prediction_rows(prediction, labels):
            self._file.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
            if len(self._first) < self.show:
                self._first.append(row)
            self._count += 1

    @override
    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        assert self.path is not None and self._commit is not None
        commit, self._commit, self._file = self._commit, None, None
        commit.close()  # fsync, then rename over the target
        if self.show and trainer.is_global_zero:
            print(format_rows(self._first, self.max_width), file=sys.stdout)
        if trainer.is_global_zero:
            print(f"lightning-adapt: {self._count} predictions written to {self.path}", file=sys.stdout)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if self._commit is not None:
            commit, self._commit, self._file = self._commit, None, None
            commit.__exit__(type(exception), exception, exception.__traceback__)  # removes the temp file


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value


def prediction_rows(prediction: Any, labels: list[str] | None = None) -> list[dict[str, Any]]:
    """One JSON-ready dict per example of a batch's prediction; integer ``label``/``gold`` named by ``labels``."""
    if isinstance(prediction, torch.Tensor):
        rows: list[dict[str, Any]] = [{"prediction": p} for p in prediction.tolist()]
    elif isinstance(prediction, dict):
        rows = [prediction]
    else:
        rows = [r if isinstance(r, dict) else {"prediction": r} for r in prediction]
    out = []
    for row in rows:
        row = {k: _plain(v) for k, v in row.items()}
        for key in ("label", "gold"):
            if labels and isinstance(row.get(key), int) and 0 <= row[key] < len(labels):
                row[key] = labels[row[key]]
        out.append(row)
    return out


def _cell(value: Any, width: int) -> str:
    if isinstance(value, list) and value and all(isinstance(v, float) for v in value):
        text = "[" + ", ".join(f"{v:.3f}" for v in value) + "]"
    else:
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def format_rows(rows: list[dict[str, Any]], max_width: int = 48) -> str:
    """A Markdown table of ``rows`` (columns: the keys of the first row), cells cut to ``max_width``."""
    if not rows:
        return "(no predictions)"
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "|".join("---" for _ in keys) + "|"]
    lines += ["| " + " | ".join(_cell(row.get(k, ""), max_width) for k in keys) + " |" for row in rows]
    return "\n".join(lines)
