"""Instruction-tuning data in a chat template: your conversations in the field's formats, or prompt/response pairs
from ``chatterbot-corpus`` (BSD)."""

from __future__ import annotations

import functools
import itertools
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
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
from lightning_adapt.data.batching import IGNORE_INDEX, Batching, check_batching, left_padded_prompts, training_loader
from lightning_adapt.data.conversation import (
    as_messages,
    chat_turn_texts,
    encode_conversation,
    no_conversations,
    read_chat_conversations,
)
from lightning_adapt.data.formats import (
    FORMAT_COLUMNS,
    BadRecord,
    ChatFormat,
    choose_format,
    format_problem,
    to_conversation,
)
from lightning_adapt.data.resumable import ResumableDataLoader
from lightning_adapt.data.sources import column_names
from lightning_adapt.data.streaming import StreamingLoader
from lightning_adapt.data.tokenized import Rows, bad_records_error, map_cached, tokenizer_key
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
    """Conversations rendered with the tokenizer's chat template, for causal-LM tuning, from your data or the
    packaged demo corpus.

    ``source`` takes a file, a folder or a Hub dataset (:mod:`lightning_adapt.data.sources`) in any chat format of
    :mod:`lightning_adapt.data.formats`: OpenAI ``messages``, ShareGPT ``conversations``, TRL
    ``prompt``/``completion`` or Alpaca ``instruction``/``input``/``output`` (``format: auto`` picks it from the
    columns and says which). Without ``source``, prompt/response pairs of ``chatterbot-corpus`` (BSD) are used.
    The loss is on assistant tokens only: every assistant turn of a conversation (a TRL completion's only).
    Tokenization runs through ``datasets.map`` (``num_proc`` processes) and is cached on disk, so a second run of
    a recipe reads it back (:mod:`lightning_adapt.data.tokenized`). Every bad record is reported at once, before
    any training.

    Training/validation batches hold ``input_ids``, ``attention_mask`` and ``labels`` (prompt tokens and
    padding set to -100). Prediction batches hold left-padded prompts (``input_ids``, ``attention_mask``)
    and the ``prompt`` / ``reference`` strings (the last exchange), for generation. An example whose response
    ``max_length`` truncates away entirely would train nothing: it is dropped, with one
    :class:`NoResponseLeftWarning`.

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
        source: str | None = None,
        format: ChatFormat = "auto",
        columns: dict[str, str] | None = None,
        chat_template: str | None = None,
        split: str | None = None,
        subset: str | None = None,
        revision: str | None = None,
        val_source: str | None = None,
        val_split: str | None = None,
        data_dir: str | None = None,
        categories: list[str] | None = None,
        max_length: int = 96,
        batch_size: int = 4,
        train_size: int | None = None,
        val_size: int = 64,
        seed: int = 42,
        num_workers: int = 0,
        num_proc: int | None = None,
        streaming: bool = False,
        batching: Batching = "pad",
        multi_turn: bool = False,
    ) -> None:
        """
        Args:
            source: your conversations: a ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` / ``.arrow`` file, a
                folder of them, a ``save_to_disk`` folder or a Hub dataset id (``org/name``); ``None``: the packaged
                demo corpus (``data_dir`` / ``categories``).
            format: the chat format of ``source``: ``messages`` (OpenAI), ``sharegpt``, ``prompt_completion`` (TRL),
                ``alpaca``, or ``auto`` (chosen from the columns, and printed).
            columns: the format's field names mapped to your columns, e.g. ``{messages: dialogue}``.
            chat_template: a Jinja chat template (the text, or a path to a ``.jinja`` file) for a tokenizer that has
                none, or to replace its own.
            split: the split of ``source`` to train on (``None``: ``train``).
            subset: the subset (configuration) of a folder or Hub dataset that has several.
            revision: with a Hub dataset id: the branch, tag or commit sha.
            val_source: validation data in the same format (a file, folder or Hub id); ``None``: ``val_split`` of
                ``source``, else ``val_size`` examples held out of the training split (seeded).
            val_split: the split to validate on (of ``val_source``, else of ``source``).
            data_dir: the demo data only: a folder of chatterbot-style ``*.yml`` files; ``None`` uses the English
                corpus of ``chatterbot-corpus``.
            categories: the demo data only: file stems to keep (e.g. ``[greetings, science]``); ``None`` keeps all.
            num_proc: processes that tokenize (``datasets.map``); ``None``: this one.
            streaming: read ``source`` as it trains (data larger than memory; :mod:`lightning_adapt.data.streaming`):
                tokenized on the fly, shuffled through a buffer, validation = the first ``val_size`` records (unless
                ``val_source`` / ``val_split``); a resumed run re-reads its epoch up to where it stopped.
            batching: how training examples form batches: ``pad`` (padded to the longest), ``group_by_length``
                (examples of similar length together) or ``pack`` (concatenated into one row of up to
                ``batch_size × max_length`` tokens, attention kept inside each example; no padding).
            multi_turn: the demo data only: each conversation is one example of alternating user / assistant turns,
                with the loss on every assistant turn (:mod:`lightning_adapt.data.conversation`); ``False``: each
                consecutive pair of turns is one prompt/response example. Your ``source`` is always read whole.
        """
        check_readable(data_dir, "data.data_dir", "directory")
        checks = (
            check_batching(batching),
            format_problem(format),
            _check_source_settings(source, data_dir, categories),
        )
        if problems := [p for p in checks if p]:
            raise DataError("; ".join(problems))
        super().__init__(tokenizer, max_length, batch_size, train_size, val_size, seed, num_workers)
        self.save_hyperparameters()
        self.source, self.format, self.columns, self.chat_template = source, format, dict(columns or {}), chat_template
        self.split, self.subset, self.revision = split, subset, revision
        self.val_source, self.val_split, self.num_proc, self.streaming = val_source, val_split, num_proc, streaming
        self.data_dir = data_dir
        self.categories = categories
        self.batching = batching
        self.multi_turn = multi_turn

    @override
    def setup(self, stage: str) -> None:
        if self._splits:
            return
        self.tokenizer = load_tokenizer(tokenizer_source(self), "data.tokenizer")
        apply_chat_template(self.tokenizer, self.chat_template, self.tokenizer_name)
        if self.source is None:
            train, val = self._demo_tables()
        else:
            train, val = self.source_tables(
                streaming=self.streaming,
                prepare=self._encode_table,
            )
        if self.streaming:  # validation: a few records, held whole; training: read as it trains
            self._splits = {"train": train, "val": list(val)}
            return
        self._splits = {"train": Rows(train), "val": Rows(val)}
        if stage != "predict":  # generation needs only the prompt; a truncated reference is still shown
            self._splits = drop_responseless(self._splits, self.max_length)

    def _demo_tables(self) -> tuple[Any, Any]:
        """The packaged corpus as ``messages`` records, split as before (:func:`split_indices`)."""
        import datasets

        folder = self.data_dir or str(
            packaged_path("chatterbot_corpus", "chatterbot-corpus==1.3.3", "data/english", "data.data_dir")
        )
        if self.multi_turn:
            conversations = [as_messages(turns) for turns in read_chat_conversations(folder, self.categories)]
        else:
            conversations = [as_messages([a, b]) for a, b in read_chat_pairs(folder, self.categories)]
        table = self._encode_table(datasets.Dataset.from_list([{"messages": c} for c in conversations]), folder, "")
        train_idx, val_idx = split_indices(len(table), self.val_size, self.train_size, self.seed)
        return table.select(train_idx), table.select(val_idx)

    def _encode_table(self, table: Any, source: str, setting: str) -> Any:
        """``table``'s records tokenized (cached); every record that is not a usable conversation is reported."""
        renames = {theirs: ours for ours, theirs in self.columns.items() if theirs != ours}
        if missing := [c for c in renames if c not in column_names(table)]:
            raise DataError(
                f"data.columns={self.columns}: {source!r} has no column {', '.join(missing)} (columns found: "
                f"{', '.join(column_names(table))}). Fix: map each format field to a column the data has.",
            )
        table = table.rename_columns(renames) if renames else table
        chosen = choose_format(self.format, column_names(table), source)
        if self.format == "auto" and self.source is not None:
            rank_zero_info(f"lightning-adapt: data.format=auto read {source!r} as {chosen!r}")
        table = table.select_columns(list(_present(chosen, column_names(table))))
        encode = functools.partial(
            encode_chat_batch, tokenizer=self.tokenizer, format=chosen, max_length=self.max_length
        )
        key = (tokenizer_key(self.tokenizer), chosen, self.max_length)
        if self.streaming:  # the first records checked now, every later one as it is read
            first = list(table.take(_CHECKED_FIRST))
            sample = encode({name: [record[name] for record in first] for name in (first[0] if first else {})})
            _raise_bad(sample["problem"], source, chosen, setting)
            return table.map(encode, batched=True, remove_columns=column_names(table)).filter(_learnable)
        encoded = map_cached(table, encode, key=key, num_proc=self.num_proc, desc=f"tokenize {Path(source).name}")
        _raise_bad(encoded["problem"], source, chosen, setting)
        return encoded.remove_columns("problem")

    @override
    def train_dataloader(self) -> ResumableDataLoader | StreamingLoader:
        """Shuffled per epoch from ``seed`` in the ``batching`` layout; resumes exactly from any checkpoint."""
        if "train" not in self._splits:
            raise DataError(f"{type(self).__name__}.setup() must run before asking for a dataloader.")
        if self.streaming:
            return StreamingLoader(
                self._splits["train"],
                batching=self.batching,
                batch_size=self.batch_size,
                max_length=self.max_length,
                seed=self.seed,
                collate=self.collate,
            )
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


def _check_source_settings(source: str | None, data_dir: str | None, categories: list[str] | None) -> str | None:
    if source is None or (data_dir is None and categories is None):
        return None
    return (
        f"data.source={source!r} is set, so data.data_dir / data.categories (the demo corpus's settings) would be "
        "ignored. Fix: leave them out (null) with a source"
    )


def _raise_bad(problems: list[str], source: str, format: str, setting: str) -> None:
    """One error for every record that is not a usable conversation (the first few quoted, all counted)."""
    fix = (
        "correct or drop those records (an optional system message, then user and assistant taking turns, "
        "non-empty text, at least one assistant reply)."
    )
    if error := bad_records_error(problems, source, setting or "data.source", f"usable {format} conversations", fix):
        raise error


_CHECKED_FIRST = 64  # records of a stream checked before training


def _learnable(row: dict[str, Any]) -> bool:
    """A streamed row to train on: one with a learned token (a bad record stops the run with its reason)."""
    if row["problem"]:
        raise DataError(f"data.source: a streamed record is not a usable conversation ({row['problem']}).")
    return bool(row["learned"])


def _present(format: str, columns: list[str]) -> list[str]:
    return [c for c in (*FORMAT_COLUMNS[format], "input") if c in columns]


def apply_chat_template(tokenizer: Any, template: str | None, name: str | None) -> None:
    """Set ``template`` (text, or a path to a file holding it) on ``tokenizer``; refuse a tokenizer left without one."""
    if template is not None:
        path = Path(template).expanduser()
        is_file = "{" not in template and path.is_file()
        tokenizer.chat_template = path.read_text(encoding="utf-8") if is_file else template
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(
            f"data.tokenizer={name!r} has no chat template. Fix: use a chat model, or set data.chat_template to a "
            "Jinja template (its text, or a .jinja file)."
        )


def encode_chat_batch(
    batch: dict[str, list[Any]], *, tokenizer: Any, format: str, max_length: int
) -> dict[str, list[Any]]:
    """A batch of records in ``format`` -> rows of ``input_ids``, ``labels``, ``prompt_ids``, ``prompt``,
    ``reference``, ``length``, ``learned`` (a label token survives ``max_length``) and ``problem`` (the reason a
    record is unusable, else empty)."""
    out: dict[str, list[Any]] = {
        k: [] for k in ("input_ids", "labels", "prompt_ids", "prompt", "reference", "length", "learned", "problem")
    }
    size = len(next(iter(batch.values())))
    for i in range(size):
        try:
            messages, first = to_conversation({k: v[i] for k, v in batch.items()}, format)
            row = encode_conversation(tokenizer, messages, max_length, first)
        except BadRecord as bad:
            row, messages, problem = {"input_ids": [], "labels": [], "prompt_ids": []}, [], str(bad)
        else:
            problem = ""
        last = max((j for j, m in enumerate(messages) if m["role"] == "assistant"), default=0)
        out["prompt"].append(messages[last - 1]["content"] if last else "")
        out["reference"].append(messages[last]["content"] if messages else "")
        out["length"].append(len(row["input_ids"]))
        out["learned"].append(any(x != IGNORE_INDEX for x in row["labels"]))
        out["problem"].append(problem)
        for k in ("input_ids", "labels", "prompt_ids"):
            out[k].append(row[k])
    return out


def drop_responseless(splits: dict[str, Any], max_length: int) -> dict[str, Any]:
    """``splits`` (:class:`Rows` or lists of rows) without the examples that have no response token left (one
    warning counts them all); a split left empty is refused."""

    def learned(rows: Any) -> Any:
        if isinstance(rows, Rows):  # a tokenized table says it per row: no label is read back
            keep = [i for i, ok in enumerate(rows.table["learned"]) if ok]
        else:
            keep = [i for i, r in enumerate(rows) if any(x != IGNORE_INDEX for x in r["labels"])]
        if len(keep) == len(rows):
            return rows
        return Rows(rows.table.select(keep)) if isinstance(rows, Rows) else [rows[i] for i in keep]

    kept = {name: learned(rows) for name, rows in splits.items()}
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
