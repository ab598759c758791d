"""Instruction-tuning data: prompt/response pairs from ``chatterbot-corpus`` (BSD), in a chat template."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import torch
import yaml
from typing_extensions import override

from lightning_adapt.data._common import (
    SplitDataModule,
    check_readable,
    packaged_path,
    shared_arguments_doc,
)
from lightning_adapt.errors import DataError

IGNORE_INDEX = -100


def read_chat_pairs(data_dir: str, categories: list[str] | None) -> list[tuple[str, str]]:
    """Consecutive (prompt, response) turns of every conversation in ``data_dir/*.yml``."""
    files = sorted(Path(data_dir).glob("*.yml"))
    if categories is not None:
        files = [f for f in files if f.stem in categories]
    pairs: list[tuple[str, str]] = []
    for file in files:
        try:
            conversations = (yaml.safe_load(file.read_text(encoding="utf-8")) or {}).get("conversations", [])
        except (OSError, yaml.YAMLError, AttributeError) as err:
            raise DataError(f"data.data_dir: {file} is not a readable chatterbot YAML file ({err}).") from err
        for turns in conversations:
            texts = [str(t).strip() for t in turns if isinstance(t, (str, int, float))]
            pairs.extend((a, b) for a, b in itertools.pairwise(texts) if a and b)
    if not pairs:
        raise DataError(
            f"data.data_dir={data_dir!r} (categories={categories}) holds no conversations. Fix: point it at "
            "a folder of chatterbot-style YAML files with a `conversations:` list, or fix data.categories."
        )
    return pairs


def encode_pair(tokenizer: Any, prompt: str, response: str, max_length: int) -> dict[str, list[int]]:
    """Token ids of the whole exchange; labels mask the prompt so only the response is learned."""
    head = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False
    )
    head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    ids = tokenizer(full, add_special_tokens=False)["input_ids"][:max_length]
    labels = [IGNORE_INDEX] * min(len(head_ids), len(ids)) + ids[len(head_ids) :]
    return {"input_ids": ids, "labels": labels, "prompt_ids": head_ids[:max_length]}


class ChatDataModule(SplitDataModule):
    """Prompt/response pairs rendered with the tokenizer's chat template, for causal-LM tuning.

    Training/validation batches hold ``input_ids``, ``attention_mask`` and ``labels`` (prompt tokens and
    padding set to -100). Prediction batches hold left-padded prompts (``input_ids``, ``attention_mask``)
    and the ``prompt`` / ``reference`` strings, for generation.
    """

    @shared_arguments_doc
    def __init__(
        self,
        tokenizer: str | None = None,
        data_dir: str | None = None,
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
            data_dir: a folder of chatterbot-style ``*.yml`` files; ``None`` uses the English corpus of
                ``chatterbot-corpus``.
            categories: file stems to keep (e.g. ``[greetings, science]``); ``None`` keeps all.
        """
        check_readable(data_dir, "data.data_dir", "directory")
        super().__init__(tokenizer, max_length, batch_size, train_size, val_size, seed, num_workers)
        self.save_hyperparameters()
        self.data_dir = data_dir
        self.categories = categories

    @override
    def read_examples(self) -> list[tuple[str, str]]:
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise DataError(f"data.tokenizer={self.tokenizer_name!r} has no chat template. Fix: use a chat model.")
        folder = self.data_dir or str(
            packaged_path("chatterbot_corpus", "chatterbot-corpus==1.3.3", "data/english", "data.data_dir")
        )
        return read_chat_pairs(folder, self.categories)

    @override
    def encode(self, examples: list[tuple[str, str]]) -> list[dict[str, Any]]:
        return [
            {**encode_pair(self.tokenizer, prompt, reply, self.max_length), "prompt": prompt, "reference": reply}
            for prompt, reply in examples
        ]

    @override
    def collate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Right-pad input ids and labels for teacher-forced training."""
        width = max(len(r["input_ids"]) for r in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    @override
    def predict_collate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Left-pad prompts for generation."""
        width = max(len(r["prompt_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["prompt_ids"])
            ids[i, width - n :] = torch.tensor(r["prompt_ids"])
            mask[i, width - n :] = 1
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "prompt": [r["prompt"] for r in rows],
            "reference": [r["reference"] for r in rows],
        }
