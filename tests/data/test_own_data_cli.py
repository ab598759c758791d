"""A user's own model and data through the CLI: ``recipes/chat/lora.yaml`` with only ``--data.init_args.source``
(and ``format`` where the columns do not say it) for a file in each chat format, and the model named by its Hub id,
resolved from a Hub cache on disk with ``HF_HUB_OFFLINE=1``."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch  # noqa: F401  (its log handler binds sys.stderr on import: not one test's capsys stream)
import pytest
from helpers.own_data import MULTI_TURN, SYSTEMLESS, as_format, hub_snapshot, write

from lightning_adapt.entry import main

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("fmt", "file", "flags"),
    [
        ("messages", "chats.jsonl", []),
        ("sharegpt", "chats.json", []),
        ("prompt_completion", "pairs.parquet", ["--data.init_args.format=prompt_completion"]),
        ("alpaca", "alpaca.jsonl", []),
    ],
)
def test_the_chat_recipe_trains_on_your_file_and_your_hub_model(
    fmt: str, file: str, flags: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_llama_dir: Path
) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_snapshot(tmp_path / "hf", "someone/tiny-chat-model", tiny_llama_dir)
    conversations = SYSTEMLESS * 3 if fmt in ("prompt_completion", "alpaca") else (SYSTEMLESS + MULTI_TURN) * 2
    data = write(tmp_path / file, [as_format(c, fmt) for c in conversations])
    monkeypatch.chdir(ROOT)
    main(
        [
            "fit",
            "--config=recipes/chat/lora.yaml",
            f"--data.init_args.source={data}",
            *flags,
            "--model.init_args.model_name_or_path=someone/tiny-chat-model",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
            "--data.init_args.val_size=4",
            "--merge.init_args.evaluate=false",
        ]
    )
    metrics = next((tmp_path / "runs").rglob("metrics.csv")).read_text()
    assert "val_loss" in metrics.splitlines()[0]
    merged = next((tmp_path / "runs").rglob("export/merged/config.json"))
    assert json.loads(merged.read_text())["model_type"] == "llama"
    adapter = json.loads((merged.parents[1] / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "someone/tiny-chat-model", "PEFT resolves the base by its Hub id"
