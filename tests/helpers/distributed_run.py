"""One training run of the toy module under a chosen strategy and world size, for tests/distributed/test_distributed.py.

Run as a script (Lightning's DDP launcher re-runs this file once per extra rank)::

    python tests/helpers/distributed_run.py --devices 2 --method lora --out DIR [--resume CKPT]

Every rank gets its own contiguous slice of each global batch (no sampler), so ``devices`` processes with
``global_batch / devices`` rows each see exactly the rows one process sees with ``global_batch``. Each rank
writes ``DIR/rank<r>.pt``: its local losses per step and its final trainable weights.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the helpers package when run as a script
from helpers.toy import ToyModule
from lightning_adapt import LoRAInjectionCallback, MergeOnSaveCallback, QuantizeBaseCallback

ROWS, WIDTH = 64, 64


class RankSlice(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Rank ``rank``'s rows of every global batch, in order."""

    def __init__(self, global_batch: int, world: int, rank: int) -> None:
        g = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(ROWS, WIDTH, generator=g), torch.randint(0, 4, (ROWS,), generator=g)
        local = global_batch // world
        self.index = [b + rank * local + i for b in range(0, ROWS, global_batch) for i in range(local)]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[self.index[i]], self.y[self.index[i]]


class Record(L.Callback):
    """Each rank's local loss per step and, at the end, its trainable weights."""

    def __init__(self, out: Path) -> None:
        self.out, self.losses = out, []  # type: ignore[var-annotated]

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        self.losses.append(float(outputs["loss"]))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.ignored = len(getattr(pl_module, "_ddp_params_and_buffers_to_ignore", ()))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trained = {n: p.detach().cpu().clone() for n, p in pl_module.named_parameters() if p.requires_grad}
        record = {"losses": self.losses, "trainable": trained, "ddp_ignored": self.ignored}
        torch.save(record, self.out / f"rank{trainer.global_rank}.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", default="ddp")
    parser.add_argument("--method", choices=["full", "lora", "qlora"], default="lora")
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--export", action="store_true")
    parser.add_argument("--per-rank-seed", action="store_true", help="a base that differs per rank (must fail)")
    parser.add_argument("--init", default="kaiming", help="lora.init: pissa / olora / loftq change the base")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of every rank (OMP_NUM_THREADS)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    pin_threads(args.threads)
    L.seed_everything(0)
    callbacks: list[L.Callback] = [Record(args.out), ModelCheckpoint(args.out / "ckpt", save_top_k=-1)]
    if args.method == "qlora":
        callbacks.append(QuantizeBaseCallback(mode="nf4", compute_dtype="fp32"))
    if args.method != "full":
        lora = LoRAInjectionCallback(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"], init=args.init)
        callbacks.append(lora)
    if args.export:
        callbacks.append(MergeOnSaveCallback(dirpath=str(args.out / "export")))
    strategy = args.strategy if args.devices > 1 else "auto"
    fit_toy(args, callbacks, strategy, seed_offset=1 if args.per_rank_seed else 0)


def pin_threads(threads: int | None) -> None:
    """``threads`` torch threads in this process and in the ranks Lightning's launcher starts from it (they inherit
    ``OMP_NUM_THREADS``, which also keeps Lightning from setting ``cores / ranks``); ``None``: as Lightning sets."""
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def fit_toy(
    args: argparse.Namespace, callbacks: list[L.Callback], strategy: Any, seed_offset: int = 0
) -> tuple[L.Trainer, DataLoader[Any]]:
    """Fit the toy module (built in ``configure_model``, seeded there) on this rank's slice of every global
    batch; ``seed_offset`` times the rank is added to its seed (a base that differs per rank)."""
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy,
        max_epochs=args.epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        callbacks=callbacks,
        default_root_dir=args.out,
    )
    data = RankSlice(args.global_batch, args.devices, trainer.global_rank)
    loader = DataLoader(data, batch_size=args.global_batch // args.devices, shuffle=False)
    seed = getattr(args, "seed", 0) + seed_offset * trainer.global_rank
    module = ToyModule(build_in="configure_model", lr=0.05, seed=seed)
    trainer.fit(module, train_dataloaders=loader, ckpt_path=args.resume)
    return trainer, loader


if __name__ == "__main__":
    main()
