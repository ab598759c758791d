"""How training examples of different lengths become batches: padded, grouped by length, or packed.

Three layouts of the same examples, selected by a DataModule's ``batching`` argument; every one trains on the
same tokens with the same per-token loss (the sum of response-token losses over the number of response
tokens), they differ in how many positions are padding:

* ``pad``: ``batch_size`` examples in the order of a seeded shuffle, right-padded to the longest;
* ``group_by_length``: the same shuffle, cut into mega-batches of ``50 × batch_size`` examples, each sorted by
  length and cut into batches whose order is then shuffled (:class:`LengthGroupedBatchSampler`): a batch pads
  only up to the longest of similar lengths;
* ``pack``: examples concatenated first-fit (:func:`first_fit`) into one row of at most
  ``batch_size × max_length`` tokens per batch (the token budget of one padded batch at its widest), with
  ``position_ids`` restarting at 0 for each example and no ``attention_mask`` (:func:`pack_collate`).
  transformers (checked on 5.24 for the eager and sdpa paths) reads restarting positions as a packed row and
  makes the causal mask block-diagonal, so no token attends across examples and each example's logits equal
  its logits alone, but only without a KV cache: call the model with ``use_cache=False`` (the configs of most
  chat models say ``use_cache: true``, and then the positions are not read; ``CausalLMTask`` passes it). No
  padding at all.

Each layout comes from a :class:`~lightning_adapt.data.resumable.ResumableDataLoader`: the order depends only on
``(seed, epoch)`` and a resumed epoch skips the trained batches by index, so resuming stays exact.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, get_args

import torch
from torch.utils.data import Sampler
from typing_extensions import override

from lightning_adapt.data.resumable import ResumableDataLoader, SeededShuffleSampler, _SkippingBatchSampler

__all__ = [
    "BATCHING_MODES",
    "IGNORE_INDEX",
    "Batching",
    "LengthGroupedBatchSampler",
    "check_batching",
    "first_fit",
    "left_padded_prompts",
    "pack_collate",
    "token_counts",
    "training_loader",
]

IGNORE_INDEX = -100
MEGA_BATCH = 50  # batches per mega-batch: wide enough that neighbours in length sort together (as HF's Trainer)

Batching = Literal["pad", "group_by_length", "pack"]
BATCHING_MODES: tuple[str, ...] = get_args(Batching)


def check_batching(value: str) -> str | None:
    """The problem with a ``batching`` value, or ``None`` when it is one of :data:`BATCHING_MODES`."""
    if value in BATCHING_MODES:
        return None
    return (
        f"data.batching={value!r} is not a batching mode; allowed: {list(BATCHING_MODES)}. Fix: 'pack' (no padding), "
        "'group_by_length' (batches of similar lengths) or 'pad' (each batch padded to its longest example)"
    )


class LengthGroupedBatchSampler(_SkippingBatchSampler):
    """Batches of examples of similar length, in an order still shuffled per epoch.

    Each epoch the index sampler's order (seeded per epoch: :class:`SeededShuffleSampler`, or under DDP
    Lightning's per-rank share of it) is cut into mega-batches of ``mega_batch × batch_size`` indices; each is
    sorted by length, longest first, cut into batches, and those batches are yielded in an order shuffled from
    ``seed + epoch``. The batches depend only on ``(seed, epoch)`` and number exactly as a plain
    :class:`~torch.utils.data.BatchSampler`'s, so a resumed epoch skips them by index like any other.

    Args:
        sampler: the index sampler whose order is grouped.
        batch_size: examples per batch.
        drop_last: drop the one incomplete batch (of the last mega-batch).
        lengths: the length of each example, indexed as the dataset.
        seed: base seed of the order of batches within a mega-batch (epoch ``e`` uses ``seed + e``).
        mega_batch: batches per mega-batch (more: less padding, batches less random in length).
    """

    def __init__(
        self,
        sampler: Sampler[int],
        batch_size: int,
        drop_last: bool,
        lengths: Sequence[int],
        seed: int = 0,
        mega_batch: int = MEGA_BATCH,
    ) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.lengths = list(lengths)
        self.seed = seed
        self.mega_batch = mega_batch

    @override
    def batches(self) -> Iterator[list[int]]:
        epoch = getattr(self.sampler, "epoch", 0)
        generator = torch.Generator().manual_seed(self.seed + (epoch if isinstance(epoch, int) else 0))
        order, size = list(self.sampler), self.batch_size * self.mega_batch
        for start in range(0, len(order), size):
            mega = sorted(order[start : start + size], key=self.lengths.__getitem__, reverse=True)
            chunks = [mega[i : i + self.batch_size] for i in range(0, len(mega), self.batch_size)]
            if self.drop_last and len(chunks[-1]) < self.batch_size:
                chunks.pop()
            for k in torch.randperm(len(chunks), generator=generator).tolist():
                yield chunks[k]


def first_fit(lengths: Sequence[int], capacity: int, seed: int) -> list[list[int]]:
    """Example indices packed into bins of at most ``capacity`` tokens, first fit.

    The examples are visited in an order shuffled from ``seed`` (bins mix long and short examples) and each goes
    into the first bin with room for it, else a new one. ``lengths[i] <= capacity`` for every example.

    >>> first_fit([3, 3, 2, 4], capacity=6, seed=0)
    [[0, 1], [3, 2]]
    """
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    shortest = min(lengths, default=0)
    bins: list[list[int]] = []
    room: list[int] = []
    open_bins: list[int] = []  # the bins that can still take the shortest example, in creation order
    for i in order:
        k = next((b for b in open_bins if room[b] >= lengths[i]), None)
        if k is None:
            k = len(bins)
            bins.append([])
            room.append(capacity)
            open_bins.append(k)
        bins[k].append(i)
        room[k] -= lengths[i]
        if room[k] < shortest:
            open_bins.remove(k)
    return bins


def pack_collate(rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """One packed row, shapes ``[1, T]`` with ``T`` the examples' total length.

    ``input_ids`` and ``labels`` are the examples' own, concatenated; ``position_ids`` restart at 0 for each
    example (so rotary positions are the unpacked ones and transformers masks attention per example); the label
    of each example's first token is ``IGNORE_INDEX``. That label is never a target unpacked (a model predicts
    token ``t + 1`` from the tokens up to ``t``), but packed it sits right after the previous example's last
    token, which would learn to predict it. There is no ``attention_mask``: one would hide the packing (call the
    model with ``position_ids`` and ``use_cache=False``).
    """
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for row in rows:
        ids += row["input_ids"]
        labels += [IGNORE_INDEX, *row["labels"][1:]]
        positions += range(len(row["input_ids"]))
    return {name: torch.tensor([v], dtype=torch.long) for name, v in (("input_ids", ids), ("labels", labels), ("position_ids", positions))}  # fmt: skip


def _collate_one_pack(batch: list[list[dict[str, Any]]]) -> dict[str, torch.Tensor]:
    return pack_collate(batch[0])  # a module-level function: worker processes may need to pickle it


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


def token_counts(batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """``(real tokens, positions)`` of a batch: padding is where ``attention_mask`` is 0 (a packed row has none)."""
    positions = batch["input_ids"].numel()
    mask = batch.get("attention_mask")
    return (int(mask.sum()) if mask is not None else positions), positions


def training_loader(
    batching: str,
    rows: list[dict[str, Any]],
    *,
    batch_size: int,
    max_length: int,
    seed: int,
    collate: Callable[[list[dict[str, Any]]], Any],
    num_workers: int,
) -> ResumableDataLoader:
    """The resumable training loader of ``rows`` (each with ``input_ids`` and ``labels``) in layout ``batching``;
    ``collate`` pads a list of rows (``pad`` and ``group_by_length``)."""
    return _LOADERS[batching](rows, batch_size, max_length, seed, collate, num_workers)


def _padded(rows: Any, batch_size: int, max_length: int, seed: int, collate: Any, workers: int) -> ResumableDataLoader:
    return ResumableDataLoader(rows, batch_size, shuffle=True, seed=seed, collate_fn=collate, num_workers=workers)


def _lengths(rows: Any) -> list[int]:
    """Each row's tokens (a tokenized table keeps them in a column: no row is decoded)."""
    lengths = getattr(rows, "lengths", None)
    return list(lengths) if lengths is not None else [len(r["input_ids"]) for r in rows]


def _grouped(rows: Any, batch_size: int, max_length: int, seed: int, collate: Any, workers: int) -> ResumableDataLoader:
    lengths = _lengths(rows)
    sampler = LengthGroupedBatchSampler(SeededShuffleSampler(rows, True, seed), batch_size, False, lengths, seed)
    return ResumableDataLoader(
        rows, batch_sampler=sampler, shuffle=True, seed=seed, collate_fn=collate, num_workers=workers
    )


def _packed(rows: Any, batch_size: int, max_length: int, seed: int, collate: Any, workers: int) -> ResumableDataLoader:
    bins = first_fit(_lengths(rows), batch_size * max_length, seed)
    packs = [[rows[i] for i in b] for b in bins]
    return ResumableDataLoader(packs, 1, shuffle=True, seed=seed, collate_fn=_collate_one_pack, num_workers=workers)  # type: ignore[arg-type]


_LOADERS: dict[str, Callable[..., ResumableDataLoader]] = {"pad": _padded, "group_by_length": _grouped, "pack": _packed}
