"""Your preference pairs in TRL's format (PreferenceDataModule(source)): standard and conversational records give
the expected token ids and labels (the loss on the response only), every bad record is reported before training,
the tokenization is cached, and the own-data DPO recipe fits."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from lightning_adapt.data import PreferenceDataModule
from lightning_adapt.data.batching import IGNORE_INDEX
from lightning_adapt.data.chat import encode_pair
from lightning_adapt.data.preference import preference_problem
from lightning_adapt.errors import DataError

ROOT = Path(__file__).resolve().parents[2]
PAIRS = [
    ("Hello there", "Hi! How can I help?", "Go away."),
    ("What is the boiling point of water?", "100 degrees Celsius at sea level.", "Blue."),
    ("Who wrote Hamlet?", "William Shakespeare.", "I do not know."),
    ("Name a prime number", "Seven.", "Eight."),
    ("Translate cat to French", "Chat.", "Hund."),
    ("Tell me a joke", "Why did the chicken cross the road?", "No."),
]


def _jsonl(path: Path, records: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _standard(prompt: str, chosen: str, rejected: str) -> dict[str, str]:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    return tmp_path / "cache" / "lightning_adapt"


def _rows(source: str, tiny: Path) -> list[dict[str, Any]]:
    """Every row, in the source's order (with a val_source, the training split is the whole source, unshuffled)."""
    dm = PreferenceDataModule(str(tiny), source=source, val_source=source, max_length=96)
    dm.setup("fit")
    return list(dm._splits["train"])


def test_standard_and_single_message_conversational_records_encode_alike(
    tmp_path: Path, tiny_llama_dir: Path, cache: Path
) -> None:
    standard = _jsonl(tmp_path / "standard.jsonl", [_standard(*p) for p in PAIRS])
    conversational = _jsonl(
        tmp_path / "conversational.jsonl",
        [{"prompt": _user(p), "chosen": _assistant(c), "rejected": _assistant(r)} for p, c, r in PAIRS],
    )
    rows = _rows(standard, tiny_llama_dir)
    assert _rows(conversational, tiny_llama_dir) == rows
    dm = PreferenceDataModule(str(tiny_llama_dir), source=standard, val_size=2)
    dm.setup("fit")
    for row, (prompt, chosen, rejected) in zip(rows, PAIRS, strict=True):
        good, bad = (encode_pair(dm.tokenizer, prompt, text, 96) for text in (chosen, rejected))
        assert row["chosen"] == good and row["rejected"] == bad, "the same ids and labels as a chat exchange"
        assert row["prompt_ids"] == good["prompt_ids"] and (row["prompt"], row["reference"]) == (prompt, chosen)
        n = len(good["prompt_ids"])
        assert good["labels"][:n] == [IGNORE_INDEX] * n and good["labels"][n:] == good["input_ids"][n:]


def test_a_conversational_prompt_renders_every_turn_before_the_response(
    tmp_path: Path, tiny_llama_dir: Path, cache: Path
) -> None:
    prompt = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3+3?"},
    ]
    record = {"prompt": prompt, "chosen": _assistant("6"), "rejected": _assistant("7")}
    (row,) = _rows(_jsonl(tmp_path / "pairs.jsonl", [record]), tiny_llama_dir)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    head = tok(tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False), add_special_tokens=False)
    assert "Be brief." in tok.decode(head["input_ids"]) and "2+2?" in tok.decode(head["input_ids"])
    n = len(head["input_ids"])
    for side, reply in (("chosen", "6"), ("rejected", "7")):
        full = tok.apply_chat_template([*prompt, *_assistant(reply)], tokenize=False)
        ids = tok(full, add_special_tokens=False)["input_ids"]
        assert row[side]["input_ids"] == ids
        assert row[side]["labels"] == [IGNORE_INDEX] * n + ids[n:], "no loss on the earlier assistant turn '4'"
        assert row[side]["prompt_ids"] == head["input_ids"]
    assert (row["prompt"], row["reference"]) == ("and 3+3?", "6")


def test_batches_hold_the_chosen_rows_then_the_rejected(tmp_path: Path, tiny_llama_dir: Path, cache: Path) -> None:
    source = _jsonl(tmp_path / "pairs.jsonl", [_standard(*p) for p in PAIRS])
    dm = PreferenceDataModule(str(tiny_llama_dir), source=source, val_size=2, batch_size=2)
    dm.setup("fit")
    assert (len(dm._splits["train"]), len(dm._splits["val"])) == (4, 2)
    rows = list(dm._splits["val"])
    batch = next(iter(dm.val_dataloader()))
    assert batch["input_ids"].shape[0] == 4
    for i, row in enumerate(rows):
        for side, offset in (("chosen", 0), ("rejected", 2)):
            n = len(row[side]["input_ids"])
            assert batch["input_ids"][i + offset, :n].tolist() == row[side]["input_ids"]
            assert batch["labels"][i + offset, :n].tolist() == row[side]["labels"]
            assert batch["labels"][i + offset, n:].eq(IGNORE_INDEX).all()
    predict = dm.predict_collate(rows)
    assert predict["reference"] == [r["reference"] for r in rows] and predict["prompt"] == [r["prompt"] for r in rows]


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        ({"prompt": "p", "chosen": "c", "rejected": "r"}, ""),
        ({"prompt": "p", "chosen": "c"}, "no 'rejected' (keys found: prompt, chosen)"),
        ({"prompt": "p", "chosen": None, "rejected": None}, "no 'chosen', 'rejected' (keys found: prompt)"),
        ({"prompt": " ", "chosen": "c", "rejected": "r"}, "'prompt' is empty"),
        ({"prompt": 3, "chosen": "c", "rejected": "r"}, "'prompt' is a int, not a string or a list of messages"),
        ({"prompt": [], "chosen": "c", "rejected": "r"}, "'prompt' is an empty list"),
        ({"prompt": ["hi"], "chosen": "c", "rejected": "r"}, "prompt[0] is a str, not a {role, content} message"),
        (
            {"prompt": [{"role": "bot", "content": "x"}], "chosen": "c", "rejected": "r"},
            "prompt[0].role='bot' is not allowed; allowed: ['system', 'user', 'assistant']",
        ),
        (
            {"prompt": "p", "chosen": [{"role": "user", "content": "c"}], "rejected": "r"},
            "chosen[0].role='user' is not allowed; allowed: ['assistant']",
        ),
        ({"prompt": "p", "chosen": "c", "rejected": _assistant("")}, "rejected[0].content is empty"),
        (
            {"prompt": "p", "chosen": "c", "rejected": [{"role": "assistant", "content": 4}]},
            "rejected[0].content is not a string",
        ),
    ],
)
def test_each_kind_of_bad_record_is_named(record: dict[str, Any], problem: str) -> None:
    assert preference_problem(record) == problem


def test_every_bad_record_is_counted_with_its_number_before_training(
    tmp_path: Path, tiny_llama_dir: Path, cache: Path
) -> None:
    good = {"prompt": _user("hi"), "chosen": _assistant("hello"), "rejected": _assistant("bye")}
    records = [
        good,
        {"prompt": _user("hi"), "chosen": _assistant("hello")},
        {**good, "chosen": []},
        {**good, "prompt": [{"role": "robot", "content": "hi"}]},
        {**good, "rejected": _assistant(" ")},
        good,
    ]
    source = _jsonl(tmp_path / "pairs.jsonl", records)
    with pytest.raises(DataError) as info:
        PreferenceDataModule(str(tiny_llama_dir), source=source, val_size=1).setup("fit")
    assert str(info.value).startswith(
        f"data.source={source!r}: 4 of 6 records are not preference pairs (record 2: no 'rejected' (keys found: "
        "prompt, chosen); record 3: 'chosen' is an empty list; record 4: prompt[0].role='robot' is not allowed; "
        "allowed: ['system', 'user', 'assistant']; and 1 more). Fix: each record needs \"prompt\", \"chosen\" and "
    )
    missing = _jsonl(tmp_path / "two.jsonl", [{"question": "q", "chosen": "c"}] * 3)
    with pytest.raises(DataError) as info:
        PreferenceDataModule(str(tiny_llama_dir), source=missing, val_size=1).setup("fit")
    assert str(info.value).startswith(
        f"data.source={missing!r} has no 'prompt', 'rejected' column (columns found: question, chosen). Fix: "
    )


def test_settings_that_contradict_each_other_are_refused_together() -> None:
    with pytest.raises(DataError) as info:
        PreferenceDataModule(source="a.jsonl", data_path=__file__, categories=["greetings"], num_proc=0)
    text = str(info.value)
    assert "data.categories=['greetings'] selects chatterbot files, but data.source='a.jsonl' is set" in text
    assert "but data.data_path=" in text and "are both set. Fix: keep one" in text
    assert "data.num_proc=0 must be >= 1" in text and text.count("Fix:") == 4


def test_a_second_setup_reuses_the_tokenization_cache(tmp_path: Path, tiny_llama_dir: Path, cache: Path) -> None:
    source = _jsonl(tmp_path / "pairs.jsonl", [_standard(*p) for p in PAIRS])
    first = PreferenceDataModule(str(tiny_llama_dir), source=source, val_size=2)
    first.setup("fit")
    files = sorted(cache.glob("*.arrow"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    second = PreferenceDataModule(str(tiny_llama_dir), source=source, val_size=3)
    second.setup("fit")
    assert sorted(cache.glob("*.arrow")) == files and files[0].stat().st_mtime_ns == stamp
    assert {c["filename"] for c in second._splits["val"].table.cache_files} == {str(files[0])}
    assert len(second._splits["val"]) == 3
    PreferenceDataModule(str(tiny_llama_dir), source=source, val_size=2, max_length=40).setup("fit")
    assert len(list(cache.glob("*.arrow"))) == 2, "max_length truncates the rows: tokenized again"


def test_the_example_file_is_trls_conversational_format_derived_from_chatterbot() -> None:
    lines = (ROOT / "recipes/own-data/data/preference.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 350 and all(preference_problem(r) == "" for r in records)
    assert all(r["chosen"][0]["content"] != r["rejected"][0]["content"] for r in records)
    assert [r["prompt"][0]["role"] for r in records[:5]] == ["system", "user", "user", "user", "system"]
    assert (ROOT / "recipes/own-data/data/preference.jsonl").stat().st_size < 150_000


@pytest.mark.slow  # a real recipe through the CLI (~15 s)
def test_the_own_data_dpo_recipe_fits(
    tmp_path: Path, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch, cache: Path
) -> None:
    from lightning_adapt.entry import main

    monkeypatch.chdir(ROOT)
    recipe = "recipes/own-data/dpo-lora.yaml"
    data = yaml.safe_load((ROOT / recipe).read_text())["data"]
    assert data["init_args"]["source"] == "recipes/own-data/data/preference.jsonl"
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
    assert len(train) == 2 and all(math.isfinite(x) for x in train), rows
    assert any(r.get("val_loss") for r in rows)
