"""PredictionWriter: ``predict`` keeps every prediction as JSON Lines and prints the first rows (issue 17)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightning_adapt.callbacks.predictions import PredictionWriter, format_rows, prediction_rows
from lightning_adapt.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def _budget(tmp_path: Path) -> list[str]:
    return [
        "--data.init_args.batch_size=2",
        "--data.init_args.max_length=32",
        "--data.init_args.val_size=4",
        "--data.init_args.train_size=8",
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
    ]


def _run_predict(recipe: str, tmp_path: Path, *extra: str) -> tuple[list[dict[str, object]], list[object]]:
    from lightning_adapt.cli import AdaptCLI

    cli = AdaptCLI(args=["predict", "--config", recipe, *_budget(tmp_path), *extra])
    (path,) = tmp_path.rglob("predictions.jsonl")
    assert not list(tmp_path.rglob(".predictions.jsonl.tmp-*")), "the temporary file is moved into place"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return rows, list(cli.trainer.predict_loop.predictions)


def test_sentiment_predict_writes_one_line_per_example(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(ROOT)
    rows, returned = _run_predict("recipes/sentiment/lora.yaml", tmp_path)
    flat = [row for batch in returned for row in batch]  # type: ignore[attr-defined]
    assert len(rows) == len(flat) == 4
    names = ["negative", "neutral", "positive"]
    for row, pred in zip(rows, flat, strict=True):
        assert row["text"] == pred["text"] and isinstance(row["text"], str) and row["text"]
        assert row["probabilities"] == pytest.approx(pred["probabilities"])
        assert sum(row["probabilities"]) == pytest.approx(1.0, abs=1e-5)  # type: ignore[arg-type]
        assert row["label"] == names[pred["label"]] == names[max(range(3), key=pred["probabilities"].__getitem__)]
        assert row["gold"] == names[pred["gold"]]
    out = capsys.readouterr().out
    assert "| text | label | probabilities | gold |" in out and "4 predictions written to" in out


def test_chat_predict_writes_prompt_response_reference(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(ROOT)
    rows, returned = _run_predict(
        "recipes/chat/lora.yaml", tmp_path, "--model.init_args.max_new_tokens=4", "--trainer.limit_predict_batches=1"
    )
    flat = [row for batch in returned for row in batch]  # type: ignore[attr-defined]
    assert rows == flat and len(rows) == 2
    assert all(set(r) == {"prompt", "response", "reference"} and r["response"] for r in rows)
    assert "| prompt | response | reference |" in capsys.readouterr().out


def test_rows_tables_and_bad_options(tmp_path: Path) -> None:
    assert prediction_rows(torch.tensor([[0.25, 0.75]])) == [{"prediction": [0.25, 0.75]}]
    assert prediction_rows([{"label": 1, "gold": 0}], ["a", "b"]) == [{"label": "b", "gold": "a"}]
    table = format_rows([{"text": "x" * 100 + "|", "p": [0.12345]}], max_width=10)
    assert table.splitlines()[2] == "| xxxxxxxxx… | [0.123] |"
    assert format_rows([]) == "(no predictions)"
    with pytest.raises(ConfigError, match=r"predictions.show=-1 must be >= 0"):
        PredictionWriter(show=-1)
    with pytest.raises(ConfigError, match=r"predictions.max_width=2"):
        PredictionWriter(max_width=2)


def _predict(tmp_path: Path, output: Path, fail_at: int | None) -> None:
    import lightning as L
    from torch.utils.data import DataLoader

    class Module(L.LightningModule):
        def predict_step(self, batch: torch.Tensor, batch_idx: int) -> list[dict[str, int]]:
            if batch_idx == fail_at:
                raise RuntimeError("predict failed on purpose")
            return [{"value": int(v)} for v in batch]

    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path,
        callbacks=[PredictionWriter(output=str(output), show=0)],
    )  # fmt: skip
    trainer.predict(Module(), DataLoader(torch.arange(12), batch_size=4), return_predictions=False)


def test_a_predict_that_fails_midway_keeps_the_previous_file_and_leaves_no_temp(tmp_path: Path) -> None:
    output = tmp_path / "out" / "predictions.jsonl"
    _predict(tmp_path, output, fail_at=None)
    complete = output.read_text()
    assert [json.loads(line)["value"] for line in complete.splitlines()] == list(range(12))
    with pytest.raises(RuntimeError, match="on purpose"):
        _predict(tmp_path, output, fail_at=2)  # two batches already written to the temp file
    assert output.read_text() == complete, "the failed run did not touch the previous predictions"
    assert sorted(p.name for p in output.parent.iterdir()) == ["predictions.jsonl"]


def test_two_writers_of_one_file_write_separate_temps(tmp_path: Path) -> None:
    import lightning as L

    output = tmp_path / "predictions.jsonl"
    trainer = L.Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path)
    first, second = PredictionWriter(output=str(output)), PredictionWriter(output=str(output))
    first.on_predict_start(trainer, L.LightningModule())
    second.on_predict_start(trainer, L.LightningModule())
    temps = sorted(p.name for p in tmp_path.iterdir())
    assert len(temps) == 2 and all(name.startswith(".predictions.jsonl.tmp-") for name in temps)
    for writer in (first, second):
        writer.on_exception(trainer, L.LightningModule(), RuntimeError("stopped"))
    assert list(tmp_path.iterdir()) == []
