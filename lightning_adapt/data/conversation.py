"""Completion-only labels for conversations of several turns: loss on every assistant turn, none elsewhere.

:func:`encode_conversation` renders the whole conversation once with the tokenizer's chat template and labels the
tokens of each assistant turn (its text and the template's end-of-turn tokens), as
:func:`~lightning_adapt.data.chat.encode_pair` does for one exchange; system and user turns, and the template's
headers, are -100. Each turn's span comes from rendering the conversation up to it: ``messages[:i]`` with the
generation prompt ends where assistant turn ``i`` starts, ``messages[:i + 1]`` where it ends. A template whose
renderings are not prefixes of each other (one that rewrites earlier turns) is refused rather than mislabelled.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import yaml

from lightning_adapt.data.batching import IGNORE_INDEX
from lightning_adapt.errors import DataError

__all__ = [
    "ROLES",
    "as_messages",
    "chat_turn_texts",
    "encode_conversation",
    "no_conversations",
    "read_chat_conversations",
]

ROLES = ("system", "user", "assistant")


def as_messages(turns: list[str]) -> list[dict[str, str]]:
    """Alternating ``user`` / ``assistant`` messages from plain turns, the first a user's; a last user turn without
    a reply is left out."""
    usable = turns[: len(turns) - len(turns) % 2]
    return [{"role": ("user", "assistant")[i % 2], "content": text} for i, text in enumerate(usable)]


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
    text: str = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
    return text


def _count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_conversation(
    tokenizer: Any, messages: list[dict[str, str]], max_length: int, learned_from: int = 0
) -> dict[str, list[int]]:
    """Token ids of the whole conversation (cut at ``max_length``), labels on every assistant turn from message
    ``learned_from`` on (earlier ones are context, as a TRL prompt's), and the ``prompt_ids`` of the last assistant
    turn (everything before it, with the generation prompt).

    Raises:
        DataError: a role outside :data:`ROLES`, no assistant turn, or a template that is not prefix-stable.
    """
    roles = [m.get("role") for m in messages]
    if bad := sorted({str(r) for r in roles if r not in ROLES}):
        raise DataError(f"conversation roles {bad} are not allowed; allowed: {list(ROLES)}. Fix: rename them.")
    turns = [i for i, role in enumerate(roles) if role == "assistant" and i >= learned_from]
    if not turns:
        raise DataError("a conversation has no assistant turn, so nothing to learn. Fix: drop it or add a reply.")
    full = _render(tokenizer, messages)
    ids: list[int] = tokenizer(full, add_special_tokens=False)["input_ids"]
    labels = [IGNORE_INDEX] * len(ids)
    head_ids: list[int] = []
    for i in turns:
        head, end = _render(tokenizer, messages[:i], generation_prompt=True), _render(tokenizer, messages[: i + 1])
        if not (end.startswith(head) and full.startswith(end)):
            raise DataError(
                f"data.tokenizer: its chat template renders turn {i} differently inside the whole conversation, so "
                "assistant turns cannot be located. Fix: use multi_turn=False (one exchange per example)."
            )
        start, stop = _count(tokenizer, head), _count(tokenizer, end)
        labels[start:stop] = ids[start:stop]
        if i == turns[-1]:
            head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    return {"input_ids": ids[:max_length], "labels": labels[:max_length], "prompt_ids": head_ids[:max_length]}


def chat_turn_texts(data_dir: str, categories: list[str] | None) -> list[list[str]]:
    """The turns' texts (stripped) of every conversation of ``data_dir/*.yml`` (chatterbot's ``conversations:``),
    in file order; one :class:`DataError` for an unreadable file or a folder holding no conversation."""
    files = sorted(Path(data_dir).glob("*.yml"))
    files = [f for f in files if categories is None or f.stem in categories]
    found: list[list[str]] = []
    for file in files:
        try:
            conversations = (yaml.safe_load(file.read_text(encoding="utf-8")) or {}).get("conversations", [])
        except (OSError, yaml.YAMLError, AttributeError) as err:
            raise DataError(f"data.data_dir: {file} is not a readable chatterbot YAML file ({err}).") from err
        found += [[str(t).strip() for t in turns if isinstance(t, (str, int, float))] for turns in conversations]
    return found


def no_conversations(data_dir: str, categories: list[str] | None) -> DataError:
    """The error for a chat folder that yields nothing to train on."""
    return DataError(
        f"data.data_dir={data_dir!r} (categories={categories}) holds no conversations. Fix: point it at "
        "a folder of chatterbot-style YAML files with a `conversations:` list, or fix data.categories."
    )


def read_chat_conversations(data_dir: str, categories: list[str] | None) -> list[list[str]]:
    """Every conversation of ``data_dir/*.yml`` with at least one exchange, as its turns' texts (an empty turn ends
    the usable part)."""
    found = [list(itertools.takewhile(bool, texts)) for texts in chat_turn_texts(data_dir, categories)]
    found = [texts for texts in found if len(texts) >= 2]
    if not found:
        raise no_conversations(data_dir, categories)
    return found
