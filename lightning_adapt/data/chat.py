"""Instruction-tuning data: prompt/response pairs from ``chatterbot-corpus`` (BSD), in a chat template."""

from __future__ import annotations

import itertools
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_adapt.data._common import (
    SplitDataModule,
    check_readable,
    packaged_path,
    shared_arguments_doc,
)
from lightning_adapt.data.batching import IGNORE_INDEX, Batching, check_batching, training_loader
from lightning_adapt.data.conversation import (
    as_messages,
    chat_turn_texts,
    encode_conversation,
    no_conversations,
    read_chat_conversations,
)
from lightning_adapt.data.resumable import ResumableDataLoader
from lightning_adapt.errors import DataError

__all__ = [
    "IGNORE_INDEX",
    "ChatDataModule",
    "NoResponseLeftWarning",
    "drop_responseless",
    "encode_pair",
    "left_padded_prompts",
    "read_chat_pairs",
]


class NoResponseLeftWarning(UserWarning):
    """Some examples lost every response token to ``max_length`` truncation and were dropped."""


def read_chat_pairs(data_dir: str, categories: list[str] | None) -> list[tuple[str, str]]:
    """Consecutive (prompt, response) turns of every conversation in ``data_dir/*.yml``."""
    pairs = [(a, b) for texts in chat_turn_texts(data_dir, categories) for a, b in itertools.pairwise(texts) if a and b]
    if not pairs:
        raise no_conversations(data_dir, categories)
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
    and the ``prompt`` / ``reference`` strings, for generation. An example whose response ``max_length``
    truncates away entirely would train nothing: it is dropped, with one :class:`NoResponseLeftWarning`.
    With ``multi_turn=True`` an example is a whole conversation, labelled on every assistant turn.

    ``batching`` lays out the training batches (validation stays padded); every layout trains on the same
    tokens with the same per-token loss, they differ in padding (chatterbot-corpus with SmolLM2's template,
    measured over one epoch of the training set, ``batch_size=4``: see ``docs/data.md``):

    * ``"pad"`` (the default; the chat recipes use ``"group_by_length"``): ``batch_size`` shuffled examples padded to the
      longest (12.7% of positions are padding at ``max_length=64``, 20.0% at 96);
    * ``"group_by_length"``: shuffled, then batches of examples of similar length (sorted within mega-batches
      of 50 batches, whose order is shuffled again): still ``batch_size`` examples a batch, 0.5% / 0.9% padding;
    * ``"pack"``: the examples concatenated first-fit into one row of at most ``batch_size × max_length``
      tokens a batch, with ``position_ids`` restarting per example and no ``attention_mask`` (the batch has
      ``input_ids``, ``labels`` and ``position_ids``, shapes ``[1, T]``): no padding, and
      :class:`~lightning_adapt.tasks.CausalLMTask` passes the positions, from which transformers masks
      attention within each example. A batch holds as many examples as fit, so an epoch has fewer steps.

    Every layout resumes exactly mid-epoch (:class:`~lightning_adapt.data.resumable.ResumableDataLoader`).
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
        batching: Batching = "pad",
        multi_turn: bool = False,
    ) -> None:
        """
        Args:
            data_dir: a folder of chatterbot-style ``*.yml`` files; ``None`` uses the English corpus of
                ``chatterbot-corpus``.
            categories: file stems to keep (e.g. ``[greetings, science]``); ``None`` keeps all.
            batching: how training examples form batches: ``pad`` (padded to the longest), ``group_by_length``
                (examples of similar length together) or ``pack`` (concatenated into one row of up to
                ``batch_size × max_length`` tokens, attention kept inside each example; no padding).
            multi_turn: each conversation is one example of alternating user / assistant turns, with the loss on
                every assistant turn and none on user or system turns (:mod:`lightning_adapt.data.conversation`);
                ``False``: each consecutive pair of turns is one prompt/response example.
        """
        check_readable(data_dir, "data.data_dir", "directory")
        problem = check_batching(batching)
        if problem is not None:
            raise DataError(problem)
        super().__init__(tokenizer, max_length, batch_size, train_size, val_size, seed, num_workers)
        self.save_hyperparameters()
        self.data_dir = data_dir
        self.categories = categories
        self.batching = batching
        self.multi_turn = multi_turn

    @override
    def setup(self, stage: str) -> None:
        if self._splits:
            return
        super().setup(stage)
        if stage != "predict":  # generation needs only the prompt; a truncated reference is still shown
            self._splits = drop_responseless(self._splits, self.max_length)

    @override
    def train_dataloader(self) -> ResumableDataLoader:
        """Shuffled per epoch from ``seed`` in the ``batching`` layout; resumes exactly from any checkpoint."""
        if "train" not in self._splits:
            raise DataError(f"{type(self).__name__}.setup() must run before asking for a dataloader.")
        return training_loader(
            self.batching,
            self._splits["train"],
            batch_size=self.batch_size,
            max_length=self.max_length,
            seed=self.seed,
            collate=self.collate,
            num_workers=self.num_workers,
        )

    @override
    def read_examples(self) -> list[tuple[str, str]] | list[list[str]]:
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise DataError(f"data.tokenizer={self.tokenizer_name!r} has no chat template. Fix: use a chat model.")
        folder = self.data_dir or str(
            packaged_path("chatterbot_corpus", "chatterbot-corpus==1.3.3", "data/english", "data.data_dir")
        )
        if self.multi_turn:
            return read_chat_conversations(folder, self.categories)
        return read_chat_pairs(folder, self.categories)

    @override
    def encode(self, examples: list[Any]) -> list[dict[str, Any]]:
        if self.multi_turn:
            return [self._encode_conversation(turns) for turns in examples]
        return [
            {**encode_pair(self.tokenizer, prompt, reply, self.max_length), "prompt": prompt, "reference": reply}
            for prompt, reply in examples
        ]

    def _encode_conversation(self, turns: list[str]) -> dict[str, Any]:
        """One conversation's row; ``prompt`` / ``reference``: its last exchange (what predict generates and shows)."""
        messages = as_messages(turns)
        encoded = encode_conversation(self.tokenizer, messages, self.max_length)
        return {**encoded, "prompt": messages[-2]["content"], "reference": messages[-1]["content"]}

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
        return left_padded_prompts(rows, self.tokenizer.pad_token_id)


def left_padded_prompts(rows: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Generation batch of rows with ``prompt_ids``, ``prompt`` and ``reference``: the prompts left-padded."""
    width = max(len(r["prompt_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
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


def drop_responseless(splits: dict[str, list[dict[str, Any]]], max_length: int) -> dict[str, list[dict[str, Any]]]:
    """``splits`` without the examples that have no response token left (one warning counts them all); a split
    left empty is refused."""
    kept = {name: [r for r in rows if any(x != IGNORE_INDEX for x in r["labels"])] for name, rows in splits.items()}
    dropped = {name: len(splits[name]) - len(rows) for name, rows in kept.items() if len(rows) < len(splits[name])}
    if not dropped:
        return splits
    counts = ", ".join(f"{n} of {len(splits[name])} {name}" for name, n in dropped.items())
    empty = [name for name, rows in kept.items() if not rows]
    advice = f"Fix: raise data.max_length above {max_length} (prompt and chat template fill it before the response)"
    if empty:
        raise DataError(
            f"data.max_length={max_length} leaves no response token in any {' or '.join(empty)} example "
            f"({counts} examples have none). {advice}."
        )
    rank_zero_warn(
        f"data.max_length={max_length} truncates away every response token of {counts} examples: dropped "
        f"(they would train nothing). {advice} to keep them.",
        category=NoResponseLeftWarning,
    )
    return kept
