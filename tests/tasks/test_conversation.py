"""Completion-only labels for multi-turn conversations (issue 27): the loss covers every assistant turn and nothing
of the system or user turns, one exchange labels exactly as the single-prompt path, and ChatDataModule's option."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lightning_adapt.data import ChatDataModule
from lightning_adapt.data.batching import IGNORE_INDEX
from lightning_adapt.data.chat import encode_pair
from lightning_adapt.data.conversation import as_messages, encode_conversation
from lightning_adapt.errors import DataError

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hello there"},
    {"role": "assistant", "content": "Hi. How can I help?"},
    {"role": "user", "content": "Tell me a joke"},
    {"role": "assistant", "content": "Two atoms walk into a bar."},
    {"role": "user", "content": "Another one"},
    {"role": "assistant", "content": "No."},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir, local_files_only=True)


def _spans(labels: list[int]) -> list[tuple[int, int]]:
    """The runs of labelled positions, as (start, stop)."""
    spans: list[tuple[int, int]] = []
    for i, label in enumerate(labels):
        if label != IGNORE_INDEX and (not spans or spans[-1][1] != i):
            spans.append((i, i + 1))
        elif label != IGNORE_INDEX:
            spans[-1] = (spans[-1][0], i + 1)
    return spans


def test_every_assistant_turn_is_labelled_and_nothing_else(tokenizer: Any) -> None:
    row = encode_conversation(tokenizer, MESSAGES, max_length=512)
    ids, labels = row["input_ids"], row["labels"]
    spans = _spans(labels)
    assert len(spans) == 3, "one labelled run per assistant turn"
    texts = [tokenizer.decode(ids[a:b]) for a, b in spans]
    for text, reply in zip(texts, ["Hi. How can I help?", "Two atoms walk into a bar.", "No."], strict=True):
        assert text.startswith(reply) and text[len(reply) :].strip() == "<|im_end|>", text
    unlabelled = tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label == IGNORE_INDEX])
    for turn in MESSAGES:
        assert (turn["content"] in unlabelled) == (turn["role"] != "assistant")
    assert all(label in (IGNORE_INDEX, t) for t, label in zip(ids, labels, strict=True))
    assert tokenizer.decode(row["prompt_ids"]).endswith("Another one<|im_end|>\n<|im_start|>assistant\n")


def test_one_exchange_labels_exactly_as_the_single_prompt_path(tokenizer: Any) -> None:
    for max_length in (512, 30):
        pair = encode_pair(tokenizer, "Hello there", "Hi. How can I help?", max_length)
        assert encode_conversation(tokenizer, as_messages(["Hello there", "Hi. How can I help?"]), max_length) == pair


def test_truncation_keeps_the_turns_that_fit(tokenizer: Any) -> None:
    full = encode_conversation(tokenizer, MESSAGES, max_length=512)
    cut = encode_conversation(tokenizer, MESSAGES, max_length=len(full["input_ids"]) - 2)
    assert cut["labels"] == full["labels"][: len(cut["labels"])] and len(_spans(cut["labels"])) == 3


def test_bad_conversations_are_refused(tokenizer: Any) -> None:
    with pytest.raises(DataError, match=r"roles \['bot'\] are not allowed; allowed: \['system', 'user', 'assistant'\]"):
        encode_conversation(tokenizer, [{"role": "bot", "content": "x"}], 64)
    with pytest.raises(DataError, match="no assistant turn"):
        encode_conversation(tokenizer, [{"role": "user", "content": "x"}], 64)
    assert as_messages(["a", "b", "c"]) == [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]


def test_chat_data_module_multi_turn_trains_on_every_reply(tiny_llama_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "talk.yml").write_text(
        "conversations:\n- - Hello\n  - Hi there\n  - How are you?\n  - Fine, thanks.\n- - Who are you?\n  - A bot.\n"
    )
    kwargs: dict[str, Any] = {"tokenizer": str(tiny_llama_dir), "data_dir": str(tmp_path), "val_size": 1, "seed": 0}
    pairs = ChatDataModule(**kwargs)
    pairs.setup("fit")
    whole = ChatDataModule(**kwargs, multi_turn=True)
    whole.setup("fit")
    rows = whole._splits["train"] + whole._splits["val"]
    assert len(pairs._splits["train"]) + len(pairs._splits["val"]) == 4, "pairs: every consecutive two turns"
    assert sorted(len(_spans(r["labels"])) for r in rows) == [1, 2], "conversations: one run per reply"
    long = next(r for r in rows if len(_spans(r["labels"])) == 2)
    assert (long["prompt"], long["reference"]) == ("How are you?", "Fine, thanks.")
    batch = whole.collate(rows)
    assert batch["labels"].shape == batch["input_ids"].shape
