"""Preference pairs (prompt, chosen, rejected) for DPO / IPO / ORPO, in the tokenizer's chat template.

From a ``source`` in TRL's preference format (:mod:`lightning_adapt.data.sources` reads it: JSON Lines, Parquet,
a folder, a Hub dataset...), each record ``{"prompt", "chosen", "rejected"}`` either

* *standard*: three strings (the prompt is one user message, each response one assistant reply), or
* *conversational*: ``prompt`` a list of ``{"role", "content"}`` messages (system, user, earlier turns) and
  ``chosen`` / ``rejected`` lists holding the assistant reply;

or from a JSON Lines file of string triples (``data_path``), or by default *derived* from ``chatterbot-corpus``
(BSD): no real human preference data ships offline here, so each corpus exchange gives one pair whose ``chosen``
is the corpus's own response to the prompt and whose ``rejected`` is the response to another prompt (a seeded
derangement; never the same text). That teaches "answer this prompt, not some other one", a real but easy
preference: say so wherever its figures are quoted.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_adapt.data._common import (
    SplitDataModule,
    check_readable,
    load_tokenizer,
    packaged_path,
    shared_arguments_doc,
    split_indices,
    tokenizer_source,
)
from lightning_adapt.data.batching import IGNORE_INDEX, left_padded_prompts
from lightning_adapt.data.chat import NoResponseLeftWarning, read_chat_pairs
from lightning_adapt.data.conversation import ROLES, encode_conversation
from lightning_adapt.data.sources import column_names
from lightning_adapt.data.tokenized import Rows, bad_records_error, map_cached, tokenizer_key
from lightning_adapt.errors import DataError

__all__ = [
    "PreferenceDataModule",
    "Triple",
    "derive_pairs",
    "encode_preference",
    "preference_problem",
    "read_preference_jsonl",
]

Triple = tuple[str, str, str]
Message = dict[str, str]
_KEYS = ("prompt", "chosen", "rejected")
_FORMAT_FIX = (
    'each record needs "prompt", "chosen" and "rejected": three non-empty strings, or (TRL\'s conversational form) '
    'lists of {"role", "content"} messages, the prompt\'s roles system/user/assistant, chosen and rejected holding '
    "the assistant reply."
)


def read_preference_jsonl(path: str) -> list[Triple]:
    """Every ``(prompt, chosen, rejected)`` of a JSON Lines file; every bad line is reported at once (up to 5)."""
    triples: list[Triple] = []
    problems: list[str] = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            problems.append(f"line {number}: not JSON ({err.msg})")
            continue
        values = [record.get(k) if isinstance(record, dict) else None for k in _KEYS]
        missing = [k for k, v in zip(_KEYS, values, strict=True) if not isinstance(v, str) or not v.strip()]
        if missing:
            problems.append(f"line {number}: {missing} missing or not a non-empty string")
            continue
        triples.append((values[0], values[1], values[2]))  # type: ignore[arg-type]
    if problems or not triples:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} bad lines)" if len(problems) > 5 else "")
        raise DataError(
            f"data.data_path={path!r}: {shown or 'no records'}. Fix: one JSON object a line with the string keys "
            '"prompt", "chosen" and "rejected".'
        )
    return triples


def derive_pairs(pairs: list[tuple[str, str]], seed: int) -> list[Triple]:
    """``(prompt, response, another prompt's response)`` for each real ``(prompt, response)`` (see the module
    docstring): the responses are rotated along a seeded order, skipping any equal to the chosen one."""
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
    triples: list[Triple] = []
    for position, i in enumerate(order):
        prompt, chosen = pairs[i]
        for step in range(1, len(order)):
            rejected = pairs[order[(position + step) % len(order)]][1]
            if rejected.strip().lower() != chosen.strip().lower():
                triples.append((prompt, chosen, rejected))
                break
    return triples


def _side_problem(value: Any, field: str, roles: tuple[str, ...]) -> str:
    """Why ``value`` is not a usable ``field`` (``""``: it is): a non-empty string, or messages in ``roles``."""
    if isinstance(value, str):
        return "" if value.strip() else f"{field!r} is empty"
    if not isinstance(value, list):
        return f"{field!r} is a {type(value).__name__}, not a string or a list of messages"
    if not value:
        return f"{field!r} is an empty list"
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            return f"{field}[{i}] is a {type(message).__name__}, not a {{role, content}} message"
        if message.get("role") not in roles:
            return f"{field}[{i}].role={message.get('role')!r} is not allowed; allowed: {list(roles)}"
        content = message.get("content")
        if not isinstance(content, str) or not content.strip():
            return f"{field}[{i}].content is {'empty' if isinstance(content, str) else 'not a string'}"
    return ""


def preference_problem(record: dict[str, Any]) -> str:
    """Why ``record`` is not a preference pair in TRL's format (``""``: it is one); the first problem found."""
    if missing := [k for k in _KEYS if record.get(k) is None]:
        found = [k for k, v in record.items() if v is not None]
        return f"no {', '.join(map(repr, missing))} (keys found: {', '.join(found) or 'none'})"
    for key in _KEYS:
        if problem := _side_problem(record[key], key, ROLES if key == "prompt" else ("assistant",)):
            return problem
    return ""


def _messages(value: str | list[dict[str, Any]], role: str) -> list[Message]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return [{"role": m["role"], "content": m["content"]} for m in value]


def encode_preference(tokenizer: Any, record: dict[str, Any], max_length: int) -> dict[str, Any]:
    """One checked record (:func:`preference_problem`) as its ``chosen`` and ``rejected`` rows.

    Each side is the prompt's messages followed by the response, rendered with the chat template and cut at
    ``max_length``; its ``labels`` are the response's tokens only (the prompt, with every turn a conversational
    prompt holds, at -100: :func:`~lightning_adapt.data.conversation.encode_conversation` from the response on),
    and ``prompt_ids`` the prompt with the generation prompt. A standard record equals the conversational one with
    a single user message, token for token. ``prompt`` / ``reference``: the last prompt message and the chosen reply.
    """
    prompt = _messages(record["prompt"], "user")
    sides = {
        side: encode_conversation(tokenizer, prompt + _messages(record[side], "assistant"), max_length, len(prompt))
        for side in ("chosen", "rejected")
    }
    whole = all(any(x != IGNORE_INDEX for x in sides[s]["labels"]) for s in sides)
    reference = _messages(record["chosen"], "assistant")[-1]["content"]
    prompt_ids = sides["chosen"]["prompt_ids"]
    return {**sides, "prompt_ids": prompt_ids, "prompt": prompt[-1]["content"], "reference": reference, "whole": whole}


def encode_preference_batch(batch: dict[str, list[Any]], *, tokenizer: Any, max_length: int) -> dict[str, list[Any]]:
    """A batch of records -> their rows (:func:`encode_preference`) and ``problem`` (why a record is unusable)."""
    empty: dict[str, list[int]] = {"input_ids": [], "labels": [], "prompt_ids": []}
    unusable: dict[str, Any] = {"chosen": empty, "rejected": empty, "prompt_ids": [], "prompt": "", "reference": ""}
    unusable["whole"] = False
    out: dict[str, list[Any]] = {key: [] for key in (*unusable, "problem")}
    names = list(batch)
    for values in zip(*(batch[n] for n in names), strict=True):
        record = dict(zip(names, values, strict=True))
        problem = preference_problem(record)
        row = encode_preference(tokenizer, record, max_length) if not problem else unusable
        for key in unusable:
            out[key].append(row[key])
        out["problem"].append(problem)
    return out


class PreferenceDataModule(SplitDataModule):
    """(prompt, chosen, rejected) records in the tokenizer's chat template, for
    :class:`~lightning_adapt.tasks.PreferenceTask`.

    Training and validation batches hold ``input_ids``, ``attention_mask`` and ``labels`` of ``2 × batch_size``
    right-padded rows: the chosen exchanges first, then the rejected ones in the same order (prompt tokens and
    padding at -100, as :class:`~lightning_adapt.data.ChatDataModule` masks them). Prediction batches hold
    left-padded prompts and the ``prompt`` / ``reference`` (chosen) strings. A pair whose chosen or rejected
    response ``max_length`` truncates away entirely is dropped, with one warning. Records are tokenized once
    (:func:`~lightning_adapt.data.tokenized.map_cached`) and every unusable one is reported before training.

    Default data: pairs *derived* from ``chatterbot-corpus`` (chosen = the corpus's real response, rejected = a
    real response to a different prompt; see :func:`derive_pairs`), not human preference judgements.
    """

    @shared_arguments_doc
    def __init__(
        self,
        tokenizer: str | None = None,
        source: str | None = None,
        split: str | None = None,
        subset: str | None = None,
        revision: str | None = None,
        val_source: str | None = None,
        val_split: str | None = None,
        data_path: str | None = None,
        categories: list[str] | None = None,
        max_length: int = 96,
        batch_size: int = 4,
        train_size: int | None = None,
        val_size: int = 64,
        seed: int = 42,
        num_workers: int = 0,
        num_proc: int | None = None,
    ) -> None:
        """
        Args:
            source: preference records in TRL's format (standard strings or conversational message lists; see the
                module docstring): a data file (``.jsonl``, ``.json``, ``.csv``, ``.parquet``, ...), a folder of
                them, a ``save_to_disk`` folder or a Hub dataset id; ``None``: ``data_path``, else pairs derived
                from the English ``chatterbot-corpus`` (see the class docstring).
            split: the split of ``source`` to train on (``None``: ``train``).
            subset: the configuration of a folder or Hub dataset that has several.
            revision: with a Hub id: the branch, tag or commit.
            val_source: validation records from another source (its ``val_split``, else ``train``).
            val_split: the validation split (of ``val_source`` if set, else of ``source``); with neither,
                ``val_size`` records are held out of the training split.
            data_path: a JSON Lines file, one ``{"prompt", "chosen", "rejected"}`` object of strings a line (the
                first reader; ``source`` reads this and more).
            categories: with the derived default only: chatterbot file stems to keep (e.g. ``[greetings]``).
            num_proc: processes that tokenize (``None``: this one).
        """
        check_readable(data_path, "data.data_path", "file")
        problems = [
            f"data.categories={categories} selects chatterbot files, but data.{name}={value!r} is set. Fix: leave "
            f"categories out (null) with data.{name}."
            for name, value in (("source", source), ("data_path", data_path))
            if categories is not None and value is not None
        ]
        if source is not None and data_path is not None:
            problems.append(
                f"data.source={source!r} and data.data_path={data_path!r} are both set. Fix: keep one (source reads "
                "JSON Lines too)."
            )
        if num_proc is not None and num_proc < 1:
            problems.append(f"data.num_proc={num_proc} must be >= 1. Fix: null (this process) or a process count.")
        if problems:
            raise DataError(" ".join(problems))
        super().__init__(tokenizer, max_length, batch_size, train_size, val_size, seed, num_workers)
        self.save_hyperparameters()
        self.source, self.split, self.subset, self.revision = source, split, subset, revision
        self.val_source, self.val_split, self.num_proc = val_source, val_split, num_proc
        self.data_path = data_path
        self.categories = categories

    @override
    def setup(self, stage: str) -> None:
        if self._splits:
            return
        self.tokenizer = load_tokenizer(tokenizer_source(self), "data.tokenizer")
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise DataError(f"data.tokenizer={self.tokenizer_name!r} has no chat template. Fix: use a chat model.")
        if self.source is not None:
            train, val = self.source_tables(
                prepare=self._encode_table,
            )
        else:
            train, val = self._default_tables()
        self._splits = {"train": Rows(train), "val": Rows(val)}  # type: ignore[dict-item]
        if stage != "predict":
            self._splits = _drop_truncated(self._splits, self.max_length)

    def _default_tables(self) -> tuple[Any, Any]:
        """``data_path``'s triples, or the derived chatterbot pairs, tokenized and split (:func:`split_indices`)."""
        import datasets

        if self.data_path is not None:
            triples, where = read_preference_jsonl(self.data_path), self.data_path
        else:
            folder = packaged_path("chatterbot_corpus", "chatterbot-corpus==1.3.3", "data/english", "data.data_path")
            triples, where = derive_pairs(read_chat_pairs(str(folder), self.categories), self.seed), str(folder)
        records = datasets.Dataset.from_list([dict(zip(_KEYS, t, strict=True)) for t in triples])
        table = self._encode_table(records, where, "data.data_path")
        train_idx, val_idx = split_indices(len(table), self.val_size, self.train_size, self.seed)
        return table.select(train_idx), table.select(val_idx)

    def _encode_table(self, table: Any, source: str, setting: str) -> Any:
        """``table``'s records as chosen/rejected rows (cached); every unusable record is reported at once."""
        if missing := [k for k in _KEYS if k not in (found := column_names(table))]:
            raise DataError(
                f"{setting}={source!r} has no {', '.join(map(repr, missing))} column (columns found: "
                f"{', '.join(found)}). Fix: {_FORMAT_FIX}"
            )
        encode = functools.partial(encode_preference_batch, tokenizer=self.tokenizer, max_length=self.max_length)
        key = ("preference", tokenizer_key(self.tokenizer), self.max_length)
        name = Path(source).name or source
        encoded = map_cached(
            table.select_columns(list(_KEYS)), encode, key=key, num_proc=self.num_proc, desc=f"tokenize {name}"
        )
        if error := bad_records_error(encoded["problem"], source, setting, "preference pairs", _FORMAT_FIX):
            raise error
        return encoded.remove_columns("problem")

    @override
    def collate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """``2 × len(rows)`` right-padded rows: chosen, then rejected."""
        sides = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
        width = max(len(s["input_ids"]) for s in sides)
        ids = torch.full((len(sides), width), self.tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(sides), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(sides), width), dtype=torch.long)
        for i, side in enumerate(sides):
            n = len(side["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(side["input_ids"]), torch.tensor(side["labels"]), 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    @override
    def predict_collate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Left-padded prompts for generation, with the chosen response as the reference."""
        return left_padded_prompts(rows, self.tokenizer.pad_token_id)


def _drop_truncated(splits: dict[str, Any], max_length: int) -> dict[str, Any]:
    """``splits`` (:class:`Rows`) without the pairs of which a side has no response token left (one warning); a
    split left with none is refused."""

    def whole(rows: Rows) -> Rows:
        keep = [i for i, ok in enumerate(rows.table["whole"]) if ok]
        return rows if len(keep) == len(rows) else Rows(rows.table.select(keep))

    kept = {name: whole(rows) for name, rows in splits.items()}
    dropped = {name: len(splits[name]) - len(rows) for name, rows in kept.items() if len(rows) < len(splits[name])}
    if not dropped:
        return splits
    counts = ", ".join(f"{n} of {len(splits[name])} {name}" for name, n in dropped.items())
    advice = f"Fix: raise data.max_length above {max_length} (prompt and chat template fill it before the response)"
    if empty := [name for name, rows in kept.items() if not rows]:
        raise DataError(
            f"data.max_length={max_length} leaves no whole pair in {' or '.join(empty)} ({counts} dropped). {advice}."
        )
    rank_zero_warn(
        f"data.max_length={max_length} truncates away the chosen or rejected response of {counts} pairs: dropped. "
        f"{advice} to keep them.",
        category=NoResponseLeftWarning,
    )
    return kept
