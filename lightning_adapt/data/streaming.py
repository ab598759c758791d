"""Training batches from a stream (``streaming: true``): data larger than memory, read as it trains, resumable.

A ``datasets.IterableDataset`` of tokenized rows is shuffled through a buffer (``buffer_size`` rows, reseeded per
epoch from ``seed + epoch``), split between ranks under DDP (``datasets.distributed.split_dataset_by_node``: each
rank reads its own share of the files or rows) and laid out in the same ``batching`` modes as a table
(:mod:`lightning_adapt.data.batching`), within windows of the stream:

* ``pad``: ``batch_size`` rows as they come, padded by ``collate``;
* ``group_by_length``: windows of ``50 × batch_size`` rows sorted by length, cut into batches yielded in a seeded
  order;
* ``pack``: windows of ``50 × batch_size`` rows packed first-fit into rows of ``batch_size × max_length`` tokens.

:class:`StreamingLoader` keeps ``(epoch, batches yielded)`` and the random states in its ``state_dict``, as
:class:`~lightning_adapt.data.resumable.ResumableDataLoader` does, so Lightning resumes it exactly mid-epoch: the
resumed epoch reads the stream again from its start in the same order and skips the batches already trained (they
are read, not trained: a stream cannot seek). Under DDP the ranks stop together: a rank whose share ends first
ends the epoch for all (one scalar all-reduce a batch), so no rank waits forever for the others' gradients.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from lightning_adapt.data.batching import MEGA_BATCH, first_fit, pack_collate
from lightning_adapt.rng import capture_rng_states, restore_rng_states

__all__ = ["StreamingLoader"]


class _Batches(IterableDataset[dict[str, torch.Tensor]]):
    def __init__(self, loader: StreamingLoader) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self.loader._epoch_batches()


class StreamingLoader(DataLoader[Any]):
    """The training loader of a stream of tokenized rows (each with ``input_ids``, ``labels`` and ``length``).

    Args:
        stream: a ``datasets.IterableDataset`` of rows.
        batching: ``pad``, ``group_by_length`` or ``pack``.
        batch_size: rows a batch (``pack``: the token budget is ``batch_size × max_length``).
        max_length: the longest row.
        seed: the shuffle's seed (epoch ``e`` uses ``seed + e``).
        collate: pads a list of rows (``pad``, ``group_by_length``).
        buffer_size: rows in the shuffle buffer.
    """

    def __init__(
        self,
        stream: Any,
        *,
        batching: str,
        batch_size: int,
        max_length: int,
        seed: int,
        collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
        buffer_size: int = 1000,
    ) -> None:
        self.stream, self.batching, self.max_length, self.seed = stream, batching, max_length, seed
        self.rows_per_batch, self.collate_rows, self.buffer_size = batch_size, collate, buffer_size
        self.epoch, self._yielded = -1, 0
        self._resume: dict[str, Any] | None = None
        super().__init__(_Batches(self), batch_size=None)

    def state_dict(self) -> dict[str, Any]:
        """The epoch, the batches of it yielded so far and the random states now (see the module docstring)."""
        return {"epoch": self.epoch, "batches": self._yielded, "rng": capture_rng_states()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume = dict(state)

    def _epoch_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        resume, self._resume = self._resume, None
        self.epoch = int(resume["epoch"]) if resume is not None else self.epoch + 1
        skip = int(resume["batches"]) if resume is not None else 0
        self._yielded = skip
        batches = itertools.islice(self._layout(self._rows()), skip, None)
        if resume is not None and resume.get("rng") is not None:
            restore_rng_states(resume["rng"])
        for batch in _together(batches):
            self._yielded += 1
            yield batch

    def _rows(self) -> Iterator[dict[str, Any]]:
        from datasets.distributed import split_dataset_by_node

        stream = self.stream.shuffle(seed=self.seed, buffer_size=self.buffer_size)
        stream.set_epoch(self.epoch)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            if world > 1:
                stream = split_dataset_by_node(stream, torch.distributed.get_rank(), world)
        rows: Iterator[dict[str, Any]] = iter(stream)
        return rows

    def _layout(self, rows: Iterator[dict[str, Any]]) -> Iterator[dict[str, torch.Tensor]]:
        size = self.rows_per_batch
        if self.batching == "pad":
            while chunk := list(itertools.islice(rows, size)):
                yield self.collate_rows(chunk)
            return
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        while window := list(itertools.islice(rows, size * MEGA_BATCH)):
            if self.batching == "pack":
                bins = first_fit([r["length"] for r in window], size * self.max_length, self.seed + self.epoch)
                yield from (pack_collate([window[i] for i in b]) for b in bins)
                continue
            window.sort(key=lambda r: r["length"], reverse=True)
            chunks = [window[i : i + size] for i in range(0, len(window), size)]
            for k in torch.randperm(len(chunks), generator=generator).tolist():
                yield self.collate_rows(chunks[k])


def _together(batches: Iterator[dict[str, torch.Tensor]]) -> Iterator[dict[str, torch.Tensor]]:
    """``batches`` while every rank still has one (one process: all of them)."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not distributed or torch.distributed.get_world_size() == 1:
        yield from batches
        return
    device = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" else None
    for batch in itertools.chain(batches, [None]):
        have = torch.tensor([0 if batch is None else 1], device=device)
        torch.distributed.all_reduce(have, op=torch.distributed.ReduceOp.MIN)
        if batch is None or not int(have):
            return
        yield batch
