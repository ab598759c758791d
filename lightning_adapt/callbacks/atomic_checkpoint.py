"""``AtomicCheckpointIO``: Lightning checkpoints that a kill at any instant cannot leave half-written.

Lightning's ``TorchCheckpointIO`` serialises the whole checkpoint into memory (``io.BytesIO``: a second copy of
every saved tensor) and writes it through an fsspec transaction whose temp file lies in the *system* temp
folder; the commit is ``shutil.move``, which is a rename only when that folder is on the checkpoint's file system.
When it is not (``/tmp`` on tmpfs, checkpoints on a mounted volume: the usual cloud layout) the move is a copy,
and a kill during it leaves a truncated ``last.ckpt`` that ``--ckpt_path last`` would load next.

This plugin streams ``torch.save`` straight into ``.<name>.tmp-<pid>-*`` beside the target, ``fsync``\\ s it and
renames it into place (:func:`lightning_adapt.atomic.atomic_file`): no in-memory copy, and the target is always
the previous complete checkpoint or the new one. Temp files of dead writers are removed by the next save. Remote
paths (``s3://`` ...) keep Lightning's own path.

The ``lightning-adapt`` CLI and every transform callback (``quantize:``, ``lora:``) install it when the strategy
uses the default ``TorchCheckpointIO``; with a plain ``Trainer`` pass ``plugins=[AtomicCheckpointIO()]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

from lightning_adapt.atomic import atomic_file

__all__ = ["AtomicCheckpointIO", "install_atomic_checkpoint_io"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves are atomic and ``fsync``\\ ed, streamed to disk without an in-memory copy."""

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        fs = get_filesystem(path)
        if storage_options is not None or "file" not in fs.protocol:
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        with atomic_file(Path(path)) as handle:
            torch.save(checkpoint, handle)


def install_atomic_checkpoint_io(trainer: L.Trainer) -> None:
    """Make ``trainer`` save through :class:`AtomicCheckpointIO` if it uses Lightning's default plugin."""
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
