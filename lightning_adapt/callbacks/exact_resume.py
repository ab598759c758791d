"""Keep the global random streams in every checkpoint, so a resumed run draws the same dropout masks.

Lightning saves the model, optimizer, schedulers and loop counters, but not the random states; a resumed run
with dropout (LoRA's included) then trains on other masks. The ready DataModules' loader
(:class:`~lightning_adapt.data.ResumableDataLoader`) saves them itself, with its position; this callback is
for modules whose training loader does not (their own loader, torchdata's ``StatefulDataLoader``...).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_adapt.rng import capture_rng_states, restore_rng_states


class NotResumableLoaderWarning(UserWarning):
    """The training loader has no ``state_dict``/``load_state_dict``: a mid-epoch resume restarts its epoch."""


class ExactResumeCallback(Callback):
    """Save the global random states (torch, every CUDA device, NumPy, Python) with each checkpoint and put
    them back right before the first training batch of a resumed fit.

    With a resumable training loader (one with ``state_dict``/``load_state_dict``, which Lightning saves and
    restores) and a data order that does not come from the global generator, a run killed at any point and
    resumed from its last checkpoint then continues bit for bit on CPU: same batches, same dropout masks,
    same optimizer and scheduler steps. At fit start it warns once if a training loader is not resumable.
    A loader that restores the random states itself (``restore_rng=True`` of
    :class:`~lightning_adapt.data.ResumableDataLoader`) is left to do it, as it does so before fetching
    the first batch.

    Example:
        >>> trainer = pl.Trainer(callbacks=[ExactResumeCallback()])
        >>> trainer.fit(module, ckpt_path="last")

    Args:
        warn_not_resumable: warn at fit start about training loaders that cannot resume mid-epoch.
    """

    def __init__(self, warn_not_resumable: bool = True) -> None:
        super().__init__()
        self.warn_not_resumable = warn_not_resumable
        self._pending: dict[str, Any] | None = None

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"rng": capture_rng_states()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict.get("rng")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loaders = _flatten(trainer.train_dataloader)
        if any(getattr(loader, "restore_rng", False) is True for loader in loaders):
            self._pending = None
        plain = [type(loader).__name__ for loader in loaders if not _is_stateful(loader)]
        if self.warn_not_resumable and plain:
            rank_zero_warn(
                f"ExactResumeCallback: the training loader ({', '.join(plain)}) has no state_dict/load_state_dict, "
                "so a run resumed from a mid-epoch checkpoint restarts the epoch. Fix: return a "
                "lightning_adapt.data.ResumableDataLoader from train_dataloader().",
                category=NotResumableLoaderWarning,
            )

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._pending is not None:
            restore_rng_states(self._pending)
            self._pending = None


def _is_stateful(loader: object) -> bool:
    return callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None))


def _flatten(loaders: Any) -> list[Any]:
    """The loaders of ``trainer.train_dataloader``: one, or a list/tuple/dict of them (nested)."""
    if isinstance(loaders, dict):
        return [x for v in loaders.values() for x in _flatten(v)]
    if isinstance(loaders, list | tuple):
        return [x for v in loaders for x in _flatten(v)]
    return [] if loaders is None else [loaders]


__all__ = ["ExactResumeCallback", "NotResumableLoaderWarning"]
