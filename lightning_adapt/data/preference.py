"""Preference pairs (prompt, chosen, rejected) for DPO / IPO / ORPO, in the tokenizer's chat template.

From a JSON Lines file (one ``{"prompt": ..., "chosen": ..., "rejected": ...}`` object a line), or by default
*derived* from ``chatterbot-corpus`` (BSD): no real human preference data ships offline here, so each corpus
exchange gives one pair whose ``chosen`` is the corpus's own response to the prompt and whose ``rejected`` is the
response to another prompt (a seeded derangement; never the same text). That teaches "answer this prompt, not some
other one", a real but easy preference: say so wherever its figures are quoted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_adapt.data._common import SplitDataModule, check_readable, packaged_path, shared_arguments_doc
from lightning_adapt.data.batching import IGNORE_INDEX
from lightning_adapt.data.chat import NoResponseLeftWarning, encode_pair, left_padded_prompts, read_chat_pairs
from lightning_adapt.errors import DataError

__all__ = ["PreferenceDataModule", "Triple", "derive_pairs", "read_preference_jsonl"]

Triple = tuple[str, str, str]
_KEYS = ("prompt", "chosen", "rejected")


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


class PreferenceDataModule(SplitDataModule):
    """(prompt, chosen, rejected) records in the tokenizer's chat template, for
    :class:`~lightning_adapt.tasks.PreferenceTask`.

    Training and validation batches hold ``input_ids``, ``attention_mask`` and ``labels`` of ``2 × batch_size``
    right-padded rows: the chosen exchanges first, then the rejected ones in the same order (prompt tokens and
    padding at -100, as :class:`~lightning_adapt.data.ChatDataModule` masks them). Prediction batches hold
    left-padded prompts and the ``prompt`` / ``reference`` (chosen) strings. A pair whose chosen or rejected
    response ``max_length`` truncates away entirely is dropped, with one warning.

    Default data: pairs *derived* from ``chatterbot-corpus`` (chosen = the corpus's real response, rejected = a
    real response to a different prompt; see :func:`derive_pairs`), not human preference judgements.
    """

    @shared_arguments_doc
    def __init__(
        self,
        tokenizer: str | None = None,
        data_path: str | None = None,
        categories: list[str] | None = None,
        max_length: int = 96,
        batch_size: int = 4,
        train_size: int | None = None,
        val_size: int = 64,
        seed: int = 42,
        num_workers: int = 0,
    ) -> None:
        """
        Args:
            data_path: a JSON Lines file, one ``{"prompt", "chosen", "rejected"}`` object a line; ``None`` derives
                pairs from the English ``chatterbot-corpus`` (see the class docstring).
            categories: with the derived default only: chatterbot file stems to keep (e.g. ``[greetings]``).
        """
        check_readable(data_path, "data.data_path", "file")
        if categories is not None and data_path is not None:
            raise DataError(
                f"data.categories={categories} selects chatterbot files, but data.data_path={data_path!r} is set. "
                "Fix: leave categories out (null) with a JSON Lines file."
            )
        super().__init__(tokenizer, max_length, batch_size, train_size, val_size, seed, num_workers)
        self.save_hyperparameters()
        self.data_path = data_path
        self.categories = categories

    @override
    def setup(self, stage: str) -> None:
        if self._splits:
            return
        super().setup(stage)
        if stage != "predict":
            self._splits = _drop_truncated(self._splits, self.max_length)

    @override
    def read_examples(self) -> list[Triple]:
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise DataError(f"data.tokenizer={self.tokenizer_name!r} has no chat template. Fix: use a chat model.")
        if self.data_path is not None:
            return read_preference_jsonl(self.data_path)
        folder = packaged_path("chatterbot_corpus", "chatterbot-corpus==1.3.3", "data/english", "data.data_path")
        return derive_pairs(read_chat_pairs(str(folder), self.categories), self.seed)

    @override
    def encode(self, examples: list[Triple]) -> list[dict[str, Any]]:
        rows = []
        for prompt, chosen, rejected in examples:
            good = encode_pair(self.tokenizer, prompt, chosen, self.max_length)
            bad = encode_pair(self.tokenizer, prompt, rejected, self.max_length)
            rows.append({"chosen": good, "rejected": bad, "prompt_ids": good["prompt_ids"], "prompt": prompt, "reference": chosen})  # fmt: skip
        return rows

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


def _drop_truncated(splits: dict[str, list[dict[str, Any]]], max_length: int) -> dict[str, list[dict[str, Any]]]:
    """``splits`` without the pairs of which a side has no response token left (one warning); none left: refused."""

    def whole(row: dict[str, Any]) -> bool:
        return all(any(x != IGNORE_INDEX for x in row[side]["labels"]) for side in ("chosen", "rejected"))

    kept = {name: [r for r in rows if whole(r)] for name, rows in splits.items()}
    dropped = {name: len(splits[name]) - len(rows) for name, rows in kept.items() if len(rows) < len(splits[name])}
    if not dropped:
        return splits
    counts = ", ".join(f"{n} of {len(splits[name])} {name}" for name, n in dropped.items())
    advice = f"Fix: raise data.max_length above {max_length} (prompt and chat template fill it before the response)"
    if empty := [name for name, rows in kept.items() if not rows]:
        raise DataError(f"data.max_length={max_length} leaves no whole pair in {' or '.join(empty)} ({counts} dropped). {advice}.")  # fmt: skip
    rank_zero_warn(
        f"data.max_length={max_length} truncates away the chosen or rejected response of {counts} pairs: dropped. "
        f"{advice} to keep them.",
        category=NoResponseLeftWarning,
    )
    return kept
