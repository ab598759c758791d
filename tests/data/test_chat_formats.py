"""Your chat data in the field's formats: the same conversations give the same token ids and labels whichever format
(and file type) they arrive in; every bad record is reported before training; the tokenization is cached."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.own_data import MULTI_TURN, SYSTEMLESS, as_format, write

from lightning_adapt.data import ChatDataModule
from lightning_adapt.data.batching import IGNORE_INDEX
from lightning_adapt.errors import DataError


def encoded(tokenizer: Path, source: Path, **kwargs: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    dm = ChatDataModule(tokenizer=str(tokenizer), source=str(source), **{"val_size": 2, "max_length": 96, **kwargs})
    dm.setup("fit")
    keys = ("input_ids", "labels", "prompt_ids", "prompt", "reference")
    return [{k: r[k] for k in keys} for r in dm._splits["train"]], [{k: r[k] for k in keys} for r in dm._splits["val"]]


@pytest.mark.parametrize(
    ("fmt", "suffix"),
    [
        ("sharegpt", ".json"),
        ("prompt_completion", ".parquet"),
        ("prompt_completion_messages", ".jsonl"),
        ("alpaca", ".jsonl"),
        ("messages", ".parquet"),
    ],
)
def test_one_conversation_encodes_the_same_in_every_format(
    fmt: str, suffix: str, tmp_path: Path, tiny_llama_dir: Path
) -> None:
    reference = encoded(tiny_llama_dir, write(tmp_path / "ref.jsonl", [as_format(c, "messages") for c in SYSTEMLESS]))
    other = encoded(tiny_llama_dir, write(tmp_path / f"data{suffix}", [as_format(c, fmt) for c in SYSTEMLESS]))
    assert other == reference
    train, _ = reference
    # the loss is on the assistant's reply only: its tokens decode to the reply and the template's end of turn
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    learned = [t for t in train[0]["labels"] if t != IGNORE_INDEX]
    assert tok.decode(learned).startswith(train[0]["reference"]) and tok.decode(learned).endswith("<|im_end|>\n")


@pytest.mark.parametrize("fmt", ["sharegpt", "prompt_completion_messages"])
def test_multi_turn_conversations_learn_every_assistant_turn(fmt: str, tmp_path: Path, tiny_llama_dir: Path) -> None:
    reference = encoded(tiny_llama_dir, write(tmp_path / "ref.jsonl", [as_format(c, "messages") for c in MULTI_TURN]))
    other = encoded(tiny_llama_dir, write(tmp_path / "d.jsonl", [as_format(c, fmt) for c in MULTI_TURN]))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    rows = reference[0] + reference[1]
    first = next(r for r in rows if r["reference"] == "Fine.")
    learned = tok.decode([t for t in first["labels"] if t != IGNORE_INDEX])
    assert learned == "Hello.<|im_end|>\nFine.<|im_end|>\n", "both assistant turns, nothing else"
    if fmt == "sharegpt":
        assert other == reference
    else:  # TRL prompt/completion: the prompt's assistant turns are context, only the completion is learned
        row = next(r for r in other[0] + other[1] if r["reference"] == "Fine.")
        assert row["input_ids"] == first["input_ids"]
        assert tok.decode([t for t in row["labels"] if t != IGNORE_INDEX]) == "Fine.<|im_end|>\n"


def test_auto_picks_the_format_from_the_columns_and_says_so(
    tmp_path: Path, tiny_llama_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path / "d.jsonl", [as_format(c, "sharegpt") for c in SYSTEMLESS])
    with caplog.at_level("INFO"):
        auto = encoded(tiny_llama_dir, path)
    assert f"data.format=auto read {str(path)!r} as 'sharegpt'" in caplog.text
    assert auto == encoded(tiny_llama_dir, path, format="sharegpt")


def test_columns_map_format_fields_to_your_names(tmp_path: Path, tiny_llama_dir: Path) -> None:
    records = [{"dialogue": as_format(c, "messages")["messages"], "id": i} for i, c in enumerate(SYSTEMLESS)]
    renamed = encoded(tiny_llama_dir, write(tmp_path / "d.jsonl", records), columns={"messages": "dialogue"})
    plain = encoded(tiny_llama_dir, write(tmp_path / "p.jsonl", [as_format(c, "messages") for c in SYSTEMLESS]))
    assert renamed == plain


def test_val_source_validates_on_its_own_file(tmp_path: Path, tiny_llama_dir: Path) -> None:
    train = write(tmp_path / "train.jsonl", [as_format(c, "messages") for c in SYSTEMLESS])
    val = write(tmp_path / "val.json", [as_format(c, "sharegpt") for c in MULTI_TURN[:2]])
    dm = ChatDataModule(tokenizer=str(tiny_llama_dir), source=str(train), val_source=str(val))
    dm.setup("fit")
    assert len(dm._splits["train"]) == len(SYSTEMLESS) and len(dm._splits["val"]) == 2
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 4 and batch["labels"].dtype == torch.long


def test_a_folder_of_split_files_and_a_saved_dataset_read_like_files(tmp_path: Path, tiny_llama_dir: Path) -> None:
    import datasets

    folder = tmp_path / "folder"
    folder.mkdir()
    write(folder / "train.jsonl", [as_format(c, "messages") for c in SYSTEMLESS])
    write(folder / "test.jsonl", [as_format(c, "messages") for c in MULTI_TURN])
    dm = ChatDataModule(tokenizer=str(tiny_llama_dir), source=str(folder), val_split="test")
    dm.setup("fit")
    assert (len(dm._splits["train"]), len(dm._splits["val"])) == (len(SYSTEMLESS), len(MULTI_TURN))
    saved = tmp_path / "saved"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list([as_format(c, "messages") for c in SYSTEMLESS])}
    ).save_to_disk(str(saved))
    from_saved = encoded(tiny_llama_dir, saved)
    from_file = encoded(tiny_llama_dir, folder / "train.jsonl")
    assert from_saved == from_file


def test_a_hub_dataset_id_reads_from_the_cache_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_llama_dir: Path
) -> None:
    files = tmp_path / "files"
    files.mkdir()
    write(files / "train.jsonl", [as_format(c, "messages") for c in SYSTEMLESS])
    repo = tmp_path / "hf" / "hub" / "datasets--org--chats"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("a" * 40)
    import shutil

    shutil.copytree(files, repo / "snapshots" / ("a" * 40))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert encoded(tiny_llama_dir, Path("org/chats")) == encoded(tiny_llama_dir, files / "train.jsonl")


def test_a_second_setup_reuses_the_tokenization_cache(
    tmp_path: Path, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    path = write(tmp_path / "d.jsonl", [as_format(c, "messages") for c in SYSTEMLESS])
    calls: list[int] = []
    import lightning_adapt.data.chat as chat

    original = chat.encode_chat_batch

    def counting(batch: dict[str, list[Any]], **kwargs: Any) -> dict[str, list[Any]]:
        calls.append(len(next(iter(batch.values()))))
        return original(batch, **kwargs)

    monkeypatch.setattr(chat, "encode_chat_batch", counting)
    first = encoded(tiny_llama_dir, path)
    assert sum(calls) == len(SYSTEMLESS)
    cached = list((tmp_path / "cache" / "lightning_adapt").glob("*.arrow"))
    assert len(cached) == 1
    assert encoded(tiny_llama_dir, path) == first
    assert sum(calls) == len(SYSTEMLESS), "the second setup tokenized nothing"
    encoded(tiny_llama_dir, path, max_length=64)
    assert sum(calls) == 2 * len(SYSTEMLESS), "another setting the encoding reads: tokenized again"


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        (
            [{"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]}],
            "record 1: roles out of order at turn 1 (user -> user)",
        ),
        ([{"messages": [{"role": "user", "content": "hi"}]}], "record 1: no assistant turn to learn"),
        (
            [{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}],
            "record 1: messages[1].role='bot' is not a role; allowed: ['assistant', 'system', 'user']",
        ),
        (
            [{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]}],
            "record 1: 'messages[0].content' is empty",
        ),
        (
            [{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}],
            "record 1: 'messages[0].content' is a int, not a string",
        ),
    ],
)
def test_every_bad_record_is_reported_before_training(
    records: list[dict[str, Any]], expected: str, tmp_path: Path, tiny_llama_dir: Path
) -> None:
    good = [as_format(c, "messages") for c in SYSTEMLESS]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [*good[:2], *records, *good[2:]]))
    with pytest.raises(DataError) as info:
        encoded(tiny_llama_dir, path)
    message = str(info.value).replace("record 1:", "record 3:")
    assert expected.replace("record 1:", "record 3:") in message, message
    assert f"1 of {len(good) + 1} records are not usable messages conversations" in message


def test_bad_records_are_all_counted_and_the_first_few_shown(tmp_path: Path, tiny_llama_dir: Path) -> None:
    bad = {"messages": [{"role": "user", "content": "only a question"}]}
    path = write(tmp_path / "d.jsonl", [bad] * 5 + [as_format(SYSTEMLESS[0], "messages")] * 3)
    with pytest.raises(DataError, match=r"5 of 8 records .*record 1: .*record 2: .*record 3: .*; and 2 more\)"):
        encoded(tiny_llama_dir, path)


def test_missing_columns_and_undecidable_formats_list_what_was_found(tmp_path: Path, tiny_llama_dir: Path) -> None:
    path = write(tmp_path / "d.jsonl", [{"question": "a", "answer": "b"}] * 4)
    with pytest.raises(DataError) as info:
        encoded(tiny_llama_dir, path)
    assert "has the columns of no chat format (columns found: question, answer;" in str(info.value)
    assert "data.columns" in str(info.value)
    with pytest.raises(DataError, match="is missing the column conversations that format 'sharegpt' reads"):
        encoded(tiny_llama_dir, path, format="sharegpt")
    both = write(tmp_path / "b.jsonl", [{**as_format(c, "messages"), **as_format(c, "alpaca")} for c in SYSTEMLESS])
    with pytest.raises(DataError, match=r"fits several chat formats \(messages, alpaca\)"):
        encoded(tiny_llama_dir, both)


def test_a_tokenizer_without_chat_template_names_chat_template(
    tmp_path: Path, tiny_llama_dir: Path, tiny_bert_dir: Path
) -> None:
    path = write(tmp_path / "d.jsonl", [as_format(c, "messages") for c in SYSTEMLESS])
    with pytest.raises(DataError, match=r"has no chat template\. Fix: .*data\.chat_template"):
        encoded(tiny_bert_dir, path)
    template = tmp_path / "t.jinja"
    template.write_text(
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    train, _ = encoded(tiny_bert_dir, path, chat_template=str(template))
    assert all(any(t != IGNORE_INDEX for t in r["labels"]) for r in train)


def test_the_cache_key_changes_with_any_data_module_s_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The encoders live in several modules of lightning_adapt/data (chat.py holds the chat one): each is keyed."""
    import shutil

    from lightning_adapt.data import tokenized

    folder = Path(tokenized.__file__).parent
    copy = tmp_path / "data"
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(tokenized, "__file__", str(copy / "tokenized.py"))
    before = tokenized._code_digest()
    assert tokenized._code_digest() == before
    for name in ("chat.py", "formats.py", "conversation.py", "preference.py", "text.py", "classification.py"):
        (copy / name).write_text((copy / name).read_text() + "\n# changed\n")
        after = tokenized._code_digest()
        assert after != before, name
        before = after
