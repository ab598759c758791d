"""The chat data formats the field uses, read into one form: a list of ``{"role", "content"}`` messages.

=====================  ======================================================  =========================================
format                 a record                                                learned
=====================  ======================================================  =========================================
``messages`` (OpenAI)  ``{"messages": [{"role": "user", "content": ...}, ...]}``  every assistant turn
``sharegpt``           ``{"conversations": [{"from": "human", "value": ...}]}``   every ``gpt`` turn
``prompt_completion``  ``{"prompt": ..., "completion": ...}`` (TRL): strings,    the completion only
                       or lists of messages
``alpaca``             ``{"instruction": ..., "input": ..., "output": ...}``    the output
=====================  ======================================================  =========================================

Roles are ``system`` (first only), then ``user`` and ``assistant`` taking turns, the user first (ShareGPT's
``human`` / ``gpt`` / ``system``, and ``user`` / ``assistant`` too, map onto them). Alpaca's prompt is the instruction,
followed by a blank line and the input when there is one. :func:`to_conversation` returns the messages and the index
of the first message that is learned (``prompt_completion`` learns only its completion); a record that is not a
usable conversation raises :class:`BadRecord` with the reason, which the DataModule collects for all records.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, get_args

from lightning_adapt.errors import SETTING, DataError

__all__ = ["FORMAT_COLUMNS", "BadRecord", "ChatFormat", "choose_format", "format_problem", "to_conversation"]

ChatFormat = Literal["auto", "messages", "sharegpt", "prompt_completion", "alpaca"]
#: The columns each format needs (Alpaca's ``input`` is optional).
FORMAT_COLUMNS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
}
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_ROLES = ("system", "user", "assistant")
Message = dict[str, str]


class BadRecord(ValueError):
    """One record that is not a usable conversation; its message is the reason."""


def format_problem(format: str) -> str | None:
    """What is wrong with a ``format`` setting, or ``None``."""
    if format in get_args(ChatFormat):
        return None
    return f"data.format={format!r} is not a chat format; allowed: {list(get_args(ChatFormat))}. Fix: one of those"


def choose_format(format: str, columns: Sequence[str], source: str) -> str:
    """The format to read a table of ``columns`` in: ``format`` itself (checked), or for ``auto`` the one format whose
    columns are there.

    Raises:
        DataError: a format's columns are missing, or ``auto`` finds no format or several (setting ``data.format``).
    """
    if problem := format_problem(format):
        raise DataError(problem + ".")
    fits = [name for name, needed in FORMAT_COLUMNS.items() if set(needed) <= set(columns)]
    wanted = fits if format == "auto" else [format]
    if len(wanted) == 1 and wanted[0] in fits:
        return wanted[0]
    found = ", ".join(columns) or "none"
    needs = "; ".join(f"{name}: {', '.join(cols)}" for name, cols in FORMAT_COLUMNS.items())
    if format != "auto":
        missing = [c for c in FORMAT_COLUMNS[format] if c not in columns]
        problem = f"is missing the column{'s' * (len(missing) > 1)} {', '.join(missing)} that format {format!r} reads"
    elif not fits:
        problem = "has the columns of no chat format"
    else:
        problem = f"fits several chat formats ({', '.join(fits)}), so format 'auto' cannot decide"
    raise DataError(
        f"data.source={source!r} {problem} (columns found: {found}; each format's columns: {needs}). Fix: set "
        f"{SETTING} to the format of the data, or map its columns with data.columns (e.g. {{messages: dialogue}}).",
        setting="data.format",
    )


def to_conversation(record: dict[str, Any], format: str) -> tuple[list[Message], int]:
    """``(messages, first learned message)`` of one record in ``format`` (not ``auto``).

    Raises:
        BadRecord: an empty or non-string field, an unknown role, roles out of order, or no assistant turn.
    """
    if format == "messages":
        messages, first = _messages(record.get("messages"), "messages", "role", "content", None), 0
    elif format == "sharegpt":
        messages, first = _messages(record.get("conversations"), "conversations", "from", "value", _SHAREGPT_ROLES), 0
    elif format == "prompt_completion":
        prompt = _side(record.get("prompt"), "prompt", "user")
        messages, first = prompt + _side(record.get("completion"), "completion", "assistant"), len(prompt)
    else:
        instruction, extra = _text(record.get("instruction"), "instruction"), record.get("input")
        if extra is not None and not isinstance(extra, str):
            raise BadRecord(f"'input' is a {type(extra).__name__}, not a string")
        question = f"{instruction}\n\n{extra.strip()}" if extra and extra.strip() else instruction
        messages, first = [_message("user", question), _message("assistant", _text(record.get("output"), "output"))], 1
    _check_order(messages)
    if not any(m["role"] == "assistant" for m in messages[first:]):
        raise BadRecord("no assistant turn to learn")
    return messages, first


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise BadRecord(f"{field!r} is {'missing' if value is None else f'a {type(value).__name__}'}, not a string")
    if not value.strip():
        raise BadRecord(f"{field!r} is empty")
    return value


def _message(role: str, content: str) -> Message:
    return {"role": role, "content": content}


def _messages(value: Any, field: str, role_key: str, text_key: str, roles: dict[str, str] | None) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise BadRecord(f"{field!r} is {'empty' if value == [] else 'not a list of messages'}")
    messages = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise BadRecord(
                f"{field}[{i}] is a {type(turn).__name__}, not an object with {role_key!r} and {text_key!r}"
            )
        role = turn.get(role_key)
        mapped = (roles or {r: r for r in _ROLES}).get(role) if isinstance(role, str) else None
        if mapped is None:
            allowed = sorted(roles or _ROLES)
            raise BadRecord(f"{field}[{i}].{role_key}={role!r} is not a role; allowed: {allowed}")
        messages.append(_message(mapped, _text(turn.get(text_key), f"{field}[{i}].{text_key}")))
    return messages


def _side(value: Any, field: str, role: str) -> list[Message]:
    """A prompt or completion: a string (one ``role`` message) or a list of messages (TRL's conversational form)."""
    if isinstance(value, list):
        return _messages(value, field, "role", "content", None)
    return [_message(role, _text(value, field))]


def _check_order(messages: list[Message]) -> None:
    roles = [m["role"] for m in messages]
    body = roles[1:] if roles and roles[0] == "system" else roles
    expected = [("user", "assistant")[i % 2] for i in range(len(body))]
    if body != expected:
        at = next(i for i, (a, b) in enumerate(zip(body, expected, strict=True)) if a != b)
        offset = len(roles) - len(body)
        raise BadRecord(
            f"roles out of order at turn {at + offset} ({' -> '.join(roles)}): an optional system message first, then "
            "user and assistant taking turns, the user first"
        )
