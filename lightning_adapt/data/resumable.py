"""A training DataLoader that resumes exactly: same order, same position, same random streams.

Lightning 2.x restores a loader's position mid-epoch only when the loader itself has ``state_dict`` /
``load_state_dict`` (the fit loop saves ``[loader.state_dict()]`` under ``loops.fit_loop.combined_loader`` and
hands it back before the first ``iter()`` of a resumed fit; a sampler's state is never asked for). For
a sized loader it fetches nothing ahead, so "batches this loader has yielded" is exactly "batches trained".

Two things make a resumed epoch equal to the uninterrupted one:

* the order: :class:`SeededShuffleSampler` draws epoch ``e``'s permutation from its own generator seeded with
  ``seed + e`` (Lightning calls ``set_epoch`` at every epoch start), never from the global generator, whose
  state mid-epoch is not the one the epoch started with;
* the position and the random streams: :class:`ResumableDataLoader` saves how many batches of which epoch it
  has yielded and the global random states (:mod:`lightning_adapt.rng`) at checkpoint time; a resumed
  iteration of that epoch skips those batches by index (nothing is loaded) and restores the random states
  right before its first batch, so dropout masks continue where they stood.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sized
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler
from typing_extensions import override

from lightning_adapt.errors import DataError
from lightning_adapt.rng import capture_rng_states, restore_rng_states

__all__ = ["ResumableDataLoader", "SeededShuffleSampler"]


class SeededShuffleSampler(Sampler[int]):
    """Indices ``0..n-1``, shuffled per epoch from ``seed + epoch`` (or in order with ``shuffle=False``).

    The order depends only on ``(seed, epoch)``: not on the global random state, not on when the iterator
    was created. Call :meth:`set_epoch` at each epoch start (Lightning does) for a new order per epoch.

    Args:
        data_source: the dataset (only its length is used).
        shuffle: permute the indices; ``False`` yields them in order.
        seed: the base seed of the permutations.
    """

    def __init__(self, data_source: Sized, shuffle: bool = True, seed: int = 0) -> None:
        self.data_source = data_source
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @override
    def __iter__(self) -> Iterator[int]:
        n = len(self.data_source)
        if not self.shuffle:
            return iter(range(n))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(n, generator=generator).tolist())

    def __len__(self) -> int:
        return len(self.data_source)


class _SkippingBatchSampler(BatchSampler):
    """A :class:`BatchSampler` whose next iteration can start ``n`` batches in, once.

    The skip is read when the iteration actually starts (its first ``next``), not at ``iter()``: a
    multi-worker DataLoader calls ``iter()`` twice on creation and drops the first iterator. Subclasses
    that form batches otherwise (:class:`~lightning_adapt.data.batching.LengthGroupedBatchSampler`) override
    :meth:`batches`, which must depend only on the index sampler's order and its epoch, and keep ``len``.
    """

    def __init__(self, sampler: Sampler[int], batch_size: int, drop_last: bool) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.skip = 0

    def batches(self) -> Iterator[list[int]]:
        """Every batch of this epoch, in order (the skip is applied on top)."""
        return super().__iter__()

    @override
    def __iter__(self) -> Iterator[list[int]]:
        skip, self.skip = self.skip, 0
        yield from itertools.islice(self.batches(), skip, None)


class ResumableDataLoader(DataLoader[Any]):
    """A DataLoader for training whose position and random streams survive a kill and a resume.

    Lightning saves :meth:`state_dict` with every checkpoint and calls :meth:`load_state_dict` before a
    resumed fit iterates; the resumed iteration of the saved epoch then skips the batches already trained
    (by index, without loading them) and restores the global random states (torch, every CUDA device,
    NumPy, Python) captured at the save just before its first batch. Use it as the ``train_dataloader`` of
    your module or DataModule (the ready DataModules do)::

        def train_dataloader(self):
            return ResumableDataLoader(self.train_set, batch_size=8, shuffle=True, seed=0)

    Random work done inside worker processes (``num_workers > 0``) is seeded per epoch, not resumed
    mid-epoch. Under DDP Lightning swaps in its ``DistributedSampler`` (itself seeded per epoch) and this
    loader keeps the position.

    Args:
        dataset: a map-style dataset (has ``__len__``).
        batch_size: examples per batch.
        shuffle: a new seeded order each epoch (:class:`SeededShuffleSampler`).
        seed: base seed of the order (epoch ``e`` uses ``seed + e``) and of the worker seeds.
        drop_last: drop the last incomplete batch.
        collate_fn: merges a list of examples into a batch (``None``: torch's default).
        num_workers: worker processes (0: load in the main process).
        pin_memory: copy batches into pinned memory.
        persistent_workers: keep the workers between epochs.
        sampler: an index sampler to use instead of :class:`SeededShuffleSampler` (then ``shuffle`` is ignored).
        batch_sampler: a batch sampler that can skip (a
            :class:`~lightning_adapt.data.batching.LengthGroupedBatchSampler`), or Lightning's re-instantiation
            passing back this loader's own.
        restore_rng: save and restore the global random states with the position. Turn off only when
            something else (e.g. :class:`~lightning_adapt.callbacks.exact_resume.ExactResumeCallback`) does.
    """

    def __init__(
        self,
        dataset: Dataset[Any],
        batch_size: int = 1,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        sampler: Sampler[int] | None = None,
        batch_sampler: BatchSampler | None = None,
        restore_rng: bool = True,
    ) -> None:
        if batch_sampler is None:
            index_sampler = sampler if sampler is not None else SeededShuffleSampler(dataset, shuffle, seed)  # type: ignore[arg-type]
            batch_sampler = _SkippingBatchSampler(index_sampler, batch_size, drop_last)
        if not isinstance(batch_sampler, _SkippingBatchSampler):
            raise DataError(
                f"ResumableDataLoader(batch_sampler={type(batch_sampler).__name__}(...)): a batch sampler of "
                "another class cannot skip the trained batches. Fix: pass `sampler=` and `batch_size=` instead."
            )
        skipper: _SkippingBatchSampler = batch_sampler
        super().__init__(
            dataset,
            batch_sampler=skipper,
            collate_fn=collate_fn,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers,
            generator=(seeder := torch.Generator()),
        )
        self.shuffle, self.seed, self.restore_rng = shuffle, seed, restore_rng
        self._skipper = skipper
        self._seeder = seeder
        self._epoch: int | None = None
        self._yielded = 0
        self._resume: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        """Where training stands: the epoch being iterated, the batches of it yielded so far and (with
        ``restore_rng``) the global random states now."""
        return {
            "epoch": self._epoch,
            "batches": self._yielded,
            "rng": capture_rng_states() if self.restore_rng else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from ``state_dict`` at the next iteration (Lightning calls this before resuming)."""
        self._resume = dict(state_dict)

    @override
    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        return self._batches()

    def _batches(self) -> Iterator[Any]:
        # A generator, so nothing below runs before the first batch is asked for: Lightning calls iter()
        # before it calls set_epoch for the epoch.
        epoch = getattr(self._skipper.sampler, "epoch", None)
        epoch = epoch if isinstance(epoch, int) else None
        resume, self._resume = self._resume, None
        self._skipper.skip = skip = _batches_to_skip(resume, epoch, len(self))
        self._epoch, self._yielded = epoch, skip
        self._seeder.manual_seed(self.seed + (epoch or 0))  # worker seeds: per epoch, not from the global state
        batches = super().__iter__()
        if resume is not None and resume.get("rng") is not None:
            restore_rng_states(resume["rng"])
        for batch in batches:
            self._yielded += 1
            yield batch


def _batches_to_skip(resume: dict[str, Any] | None, epoch: int | None, length: int) -> int:
    """How many batches of this iteration were trained before the save: all the saved ones if the save was
    in this epoch; none if it was in an earlier one (an end-of-epoch save, whatever ``limit_train_batches``)."""
    if resume is None:
        return 0
    saved_epoch, batches = resume.get("epoch"), int(resume.get("batches", 0))
    if epoch is not None and saved_epoch is not None:
        return batches if saved_epoch == epoch else 0
    return batches if batches < length else 0  # a sampler without epochs: a full pass means a new epoch
