"""Plain text for continued pretraining (TextDataModule): documents joined by EOS and packed into full rows exactly,
documents held out before packing, every bad record reported before training, the tokenization cached, and the
own-data recipe fitting."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from lightning_adapt.data import TextDataModule
from lightning_adapt.data._common import split_indices
from lightning_adapt.data.batching import IGNORE_INDEX
from lightning_adapt.errors import DataError

ROOT = Path(__file__).resolve().parents[2]
DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "Lightning trains models.",
    "A much longer document that goes on and on, so that it spills over the end of a row into the next one.",
    "Short.",
    "Tokens, tokens and more tokens: packing keeps every one of them.",
    "The end.",
]


def _jsonl(path: Path, records: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _stream(tokenizer: Any, docs: list[str]) -> list[int]:
    """What the module should pack: each document's tokens (no special tokens), then EOS."""
    return [t for d in docs for t in [*tokenizer(d, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    return tmp_path / "cache" / "lightning_adapt"


def test_documents_are_joined_by_eos_and_packed_into_full_rows(
    tmp_path: Path, tiny_llama_dir: Path, cache: Path
) -> None:
    train = _jsonl(tmp_path / "train.jsonl", [{"text": d} for d in DOCS])
    val = _jsonl(tmp_path / "val.jsonl", [{"text": d} for d in DOCS[:2]])
    dm = TextDataModule(train, tokenizer=str(tiny_llama_dir), val_source=val, max_length=16, batch_size=3)
    dm.setup("fit")
    tok = dm.tokenizer
    stream = _stream(tok, DOCS)
    rows = dm._splits["train"]
    assert len(rows) == math.ceil(len(stream) / 16) and len(stream) % 16 != 0, "a short last row to pad"
    assert [t for i in range(len(rows)) for t in rows[i]["input_ids"]] == stream
    assert all(len(rows[i]["input_ids"]) == 16 for i in range(len(rows) - 1))
    assert [len(rows[i]["input_ids"]) for i in range(len(rows))][-1] == len(stream) % 16
    assert stream.count(tok.eos_token_id) == len(DOCS), "one EOS after each document, none inside"
    assert [t for i in range(len(dm._splits["val"])) for t in dm._splits["val"][i]["input_ids"]] == _stream(
        tok, DOCS[:2]
    )

    batch = dm.collate([rows[i] for i in range(len(rows))])
    n = len(stream) % 16
    assert {k: tuple(v.shape) for k, v in batch.items()} == {k: (len(rows), 16) for k in batch}
    assert batch["input_ids"].flatten()[: len(stream)].tolist() == stream
    assert torch.equal(batch["labels"][:-1], batch["input_ids"][:-1]), "every token a target"
    assert batch["labels"][-1].tolist() == stream[-n:] + [IGNORE_INDEX] * (16 - n)
    assert batch["attention_mask"][-1].tolist() == [1] * n + [0] * (16 - n)
    assert batch["input_ids"][-1, n:].tolist() == [tok.pad_token_id] * (16 - n)
    assert batch["attention_mask"][:-1].eq(1).all()
    loader = dm.train_dataloader()
    assert [len(b["input_ids"]) for b in loader] == [3, len(rows) - 3]


def test_val_size_holds_out_whole_documents_before_packing(tmp_path: Path, tiny_llama_dir: Path, cache: Path) -> None:
    source = _jsonl(tmp_path / "docs.jsonl", [{"text": d, "id": i} for i, d in enumerate(DOCS)])
    dm = TextDataModule(source, tokenizer=str(tiny_llama_dir), val_size=2, max_length=8, seed=3)
    dm.setup("fit")
    train_idx, val_idx = split_indices(len(DOCS), 2, None, 3)

    def tokens(split: str) -> list[int]:
        rows = dm._splits[split]
        return [t for i in range(len(rows)) for t in rows[i]["input_ids"]]

    assert tokens("val") == _stream(dm.tokenizer, [DOCS[i] for i in val_idx])
    assert tokens("train") == _stream(dm.tokenizer, [DOCS[i] for i in train_idx])


def test_predict_continues_the_first_half_of_each_validation_row(
    tmp_path: Path, tiny_llama_dir: Path, cache: Path
) -> None:
    source = _jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in DOCS])
    dm = TextDataModule(source, tokenizer=str(tiny_llama_dir), val_size=2, max_length=10, batch_size=2)
    dm.setup("predict")
    rows = [dm._splits["val"][i]["input_ids"] for i in range(2)]
    assert [len(r) for r in rows] == [
        10,
        len(_stream(dm.tokenizer, [DOCS[i] for i in split_indices(6, 2, None, 42)[1]])) - 10,
    ]
    halves = [len(r) // 2 for r in rows]  # 5 and the short last row's half
    batch = next(iter(dm.predict_dataloader()))
    pad = dm.tokenizer.pad_token_id
    assert batch["input_ids"].tolist() == [[pad] * (5 - h) + r[:h] for r, h in zip(rows, halves, strict=True)]
    assert batch["attention_mask"].tolist() == [[0] * (5 - h) + [1] * h for h in halves]
    assert batch["prompt"] == [dm.tokenizer.decode(r[:h]) for r, h in zip(rows, halves, strict=True)]
    assert batch["reference"] == [dm.tokenizer.decode(r[h:]) for r, h in zip(rows, halves, strict=True)]


def test_a_missing_text_column_lists_the_columns_found(tmp_path: Path, tiny_llama_dir: Path, cache: Path) -> None:
    source = _jsonl(tmp_path / "docs.jsonl", [{"body": d, "id": 1} for d in DOCS])
    dm = TextDataModule(source, tokenizer=str(tiny_llama_dir), val_size=1)
    with pytest.raises(DataError) as info:
        dm.setup("fit")
    assert str(info.value) == (
        f"data.text_column='text' is not a column of {source!r} (columns found: body, id). Fix: set "
        "data.text_column to the column that holds the documents' text."
    )
    dm = TextDataModule(source, tokenizer=str(tiny_llama_dir), val_size=1, text_column="body")
    dm.setup("fit")
    assert len(dm._splits["train"]) > 0, "the fix works"


def test_empty_and_missing_texts_are_all_counted_with_their_record_numbers(
    tmp_path: Path, tiny_llama_dir: Path, cache: Path
) -> None:
    records: list[dict[str, Any]] = [
        {"text": "fine"},
        {"text": ""},
        {"text": None},
        {"other": "no text here"},
        {"text": "   \n"},
        {"text": "fine too"},
    ]
    source = _jsonl(tmp_path / "docs.jsonl", records)
    with pytest.raises(DataError) as info:
        TextDataModule(source, tokenizer=str(tiny_llama_dir), val_size=1).setup("fit")
    assert str(info.value) == (
        f"data.source={source!r}: 4 of 6 records are not documents (record 2: 'text' is empty; record 3: 'text' is "
        "missing, not a string; record 4: 'text' is missing, not a string; and 1 more). Fix: give every record a "
        "non-empty string in its 'text' column (data.text_column), or drop the others."
    )
    numbers = _jsonl(tmp_path / "numbers.jsonl", [{"text": 1}, {"text": 2}])
    with pytest.raises(DataError, match=r"2 of 2 records are not documents \(record 1: 'text' is a int, not a string"):
        TextDataModule(numbers, tokenizer=str(tiny_llama_dir), val_size=1).setup("fit")


def test_bad_settings_are_refused_at_construction() -> None:
    with pytest.raises(DataError, match=r"data\.num_proc=0 must be >= 1"):
        TextDataModule("x.jsonl", num_proc=0)
    with pytest.raises(DataError, match=r"data\.max_length=0: sizes must be >= 1"):
        TextDataModule("x.jsonl", max_length=0)


def test_a_second_setup_reuses_the_tokenization_cache(tmp_path: Path, tiny_llama_dir: Path, cache: Path) -> None:
    source = _jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in DOCS])
    first = TextDataModule(source, tokenizer=str(tiny_llama_dir), val_size=2, max_length=16)
    first.setup("fit")
    files = sorted(cache.glob("*.arrow"))
    assert len(files) == 1, "the whole split tokenized once, before the split"
    stamps = [f.stat().st_mtime_ns for f in files]
    second = TextDataModule(source, tokenizer=str(tiny_llama_dir), val_size=3, max_length=12)
    second.setup("fit")
    assert sorted(cache.glob("*.arrow")) == files and [f.stat().st_mtime_ns for f in files] == stamps
    assert {c["filename"] for c in second._splits["train"].table.cache_files} == {str(files[0])}
    _, val_idx = split_indices(len(DOCS), 3, None, 42)
    val = second._splits["val"]
    assert [t for i in range(len(val)) for t in val[i]["input_ids"]] == _stream(
        second.tokenizer, [DOCS[i] for i in val_idx]
    )
    other = TextDataModule(source, tokenizer=str(tiny_llama_dir), val_size=2, text_column="text", seed=1)
    other.setup("fit")
    assert sorted(cache.glob("*.arrow")) == files, "another split of the same documents: the same tokens"


@pytest.mark.slow  # a real recipe through the CLI (~10 s)
def test_the_pretrain_recipe_fits(
    tmp_path: Path, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch, cache: Path
) -> None:
    from lightning_adapt.entry import main

    monkeypatch.chdir(ROOT)
    recipe = "recipes/own-data/pretrain-lora.yaml"
    assert yaml.safe_load((ROOT / recipe).read_text())["data"]["class_path"] == "lightning_adapt.data.TextDataModule"
    main(
        [
            "fit",
            f"--config={recipe}",
            f"--model.init_args.model_name_or_path={tiny_llama_dir}",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_checkpointing=false",
            "--trainer.callbacks=[]",
            "--merge=null",
            "--trainer.log_every_n_steps=1",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ]
    )
    rows = list(csv.DictReader(next(tmp_path.rglob("metrics.csv")).open()))
    train = [float(r["train_loss"]) for r in rows if r.get("train_loss")]
    assert len(train) == 2 and all(math.isfinite(x) and x > 0 for x in train), rows
    assert any(r.get("val_loss") for r in rows)
