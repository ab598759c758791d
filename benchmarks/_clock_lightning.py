"""The probe ``bench_vs_trl.py`` adds to the ``lightning-adapt fit`` job it times: when each optimizer step ended, what
each batch held (a digest) and the final validation loss, written as JSON when the fit ends.

It only reads: no hook changes what the job computes. Its cost is one clock read and one SHA-256 of a few KiB of
token ids per batch, the same as the TRL job's probe (``_trl_job.py``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning as L
from bench_vs_trl import batch_digest, memory_now, response_tokens, start_profile, stop_profile
from typing_extensions import override


class StepClock(L.Callback):
    """Record the end of every optimizer step (``perf_counter``, ``process_time``, wall clock), a digest of every
    training and validation batch, and ``val_loss`` after the last validation; write them to ``out`` at fit end."""

    def __init__(self, out: str, profile_step: int | None = None) -> None:
        """
        Args:
            out: the JSON file to write.
            profile_step: profile this step (0-based) with ``torch.profiler``; its tables go beside ``out``.
        """
        self.out = out
        self.profile_step = profile_step
        self.profiler: Any = None
        self.memory_start: dict[str, int] = {}
        self.step_begins: list[float] = []
        self.step_ends: list[float] = []
        self.step_cpu: list[float] = []
        self.step_walls: list[float] = []
        self.train_digests: list[str] = []
        self.val_digests: list[str] = []
        self.val_tokens = 0

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self.train_digests:
            self.memory_start = memory_now()
        self.train_digests.append(batch_digest(batch))
        self.step_begins.append(time.perf_counter())
        if batch_idx == self.profile_step:
            self.profiler = start_profile()

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:  # Lightning calls it after the optimizer and scheduler steps of the batch
        self.step_ends.append(time.perf_counter())
        self.step_cpu.append(time.process_time())
        self.step_walls.append(time.time())
        if self.profiler is not None:
            stop_profile(self.profiler, Path(self.out).with_name("profile.txt"))
            self.profiler = None

    @override
    def on_validation_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not trainer.sanity_checking:
            self.val_digests.append(batch_digest(batch))
            self.val_tokens += response_tokens(batch["labels"])

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        val_loss = trainer.callback_metrics.get("val_loss")
        record = {
            "step_begins": self.step_begins,
            "step_ends": self.step_ends,
            "step_cpu": self.step_cpu,
            "step_walls": self.step_walls,
            "train_digests": self.train_digests,
            "val_digests": self.val_digests,
            "val_tokens": self.val_tokens,
            "val_loss": None if val_loss is None else float(val_loss),
            "trainable": sum(p.numel() for p in pl_module.parameters() if p.requires_grad),
            "memory_start": self.memory_start,
            "memory_end": memory_now(),
            "fit_end_wall": time.time(),
        }
        Path(self.out).write_text(json.dumps(record))
