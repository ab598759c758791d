"""The fit check under DDP, one rank short of memory, for tests/distributed/test_fit_check_ranks.py.

Run as a script (Lightning's DDP launcher re-runs this file once per extra rank)::

    python tests/helpers/fit_check_run.py --devices 2 --out DIR --short-rank 1

Rank ``--short-rank`` sees 1 byte free, the others what the machine has; every rank writes ``DIR/rank<r>.txt``: the
message it stopped with, or ``trained <steps>``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the helpers package when run as a script
from helpers.toy import tiny_llama
from lightning_adapt.callbacks import fit_check
from lightning_adapt.errors import ConfigError


class Tiny(L.LightningModule):
    """A 2-layer Llama built in ``__init__``, trained fully with AdamW."""

    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_llama()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss: torch.Tensor = self.model(**batch).loss
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--short-rank", type=int, default=1)
    args = parser.parse_args()
    real = fit_check.available_memory_bytes

    def available(device: str) -> Any:  # read when the check runs: each rank knows its LOCAL_RANK by then
        return (1, "patched free memory") if int(os.environ.get("LOCAL_RANK", "0")) == args.short_rank else real(device)

    fit_check.available_memory_bytes = available  # type: ignore[assignment]
    ids = torch.arange(32).reshape(4, 8) % 100
    rows = [{"input_ids": row, "labels": row} for row in ids]
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, strategy="ddp", max_steps=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[fit_check.FitCheckCallback()],
    )  # fmt: skip
    try:
        trainer.fit(Tiny(), DataLoader(rows, batch_size=2))  # type: ignore[arg-type]
        text = f"trained {trainer.global_step}"
    except ConfigError as err:
        text = str(err)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{trainer.global_rank}.txt").write_text(text)


if __name__ == "__main__":
    main()
