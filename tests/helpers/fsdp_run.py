"""One training run of the toy module under FSDP2 (``ModelParallelStrategy`` + ``FullyShardCallback``) or
without it, for tests/distributed/test_fsdp.py.

Run as a script (Lightning's launcher re-runs this file once per extra rank)::

    python tests/helpers/fsdp_run.py --devices 2 --shard --out DIR [--dcp] [--resume CKPT] [--method qlora]

Every rank gets its own contiguous slice of each global batch (no sampler), so ``devices`` processes with
``global_batch / devices`` rows each see exactly the rows one process sees with ``global_batch``. Each rank
writes ``DIR/rank<r>.pt``: its local losses per step, the full (gathered) trainable weights, the bytes of
the frozen base it holds and the base fingerprint its ``state_dict()`` carries.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the helpers package when run as a script
from helpers import distributed_run
from helpers.distributed_run import fit_toy
from lightning_adapt import LoRAInjectionCallback, QuantizeBaseCallback
from lightning_adapt.adapters.checkpoint import FINGERPRINT_KEY
from lightning_adapt.callbacks.shard import FullyShardCallback


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


class Record(distributed_run.Record):
    """Each rank's local loss per step and, at the end, what it holds."""

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        params = dict(pl_module.named_parameters())
        trained = {n: _full(p.detach()).cpu().clone() for n, p in params.items() if p.requires_grad}
        local = [p.to_local() if isinstance(p, DTensor) else p for p in params.values() if not p.requires_grad]
        record = {
            "losses": self.losses,
            "trainable": trained,
            "frozen_bytes": sum(t.numel() * t.element_size() for t in local),
            "sharded": sum(isinstance(p, DTensor) for p in params.values()),
            "fingerprint": pl_module.state_dict()[FINGERPRINT_KEY],
        }
        torch.save(record, self.out / f"rank{trainer.global_rank}.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--shard", action="store_true", help="ModelParallelStrategy + FullyShardCallback")
    parser.add_argument("--dcp", action="store_true", help="save_distributed_checkpoint=True (a directory)")
    parser.add_argument("--method", choices=["lora", "qlora", "qlora-int8"], default="lora")
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--validate", action="store_true", help="trainer.validate after fit")
    parser.add_argument("--seed", type=int, default=0, help="seed of the base (another base: another seed)")
    parser.add_argument("--quantized", choices=["shard", "replicate"], default="shard")
    parser.add_argument("--per-rank-seed", action="store_true", help="a base that differs per rank (must fail)")
    parser.add_argument("--init", default="kaiming", help="lora.init: pissa / olora / loftq change the base")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of every rank (OMP_NUM_THREADS)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    distributed_run.pin_threads(args.threads)
    L.seed_everything(0)
    callbacks: list[L.Callback] = [Record(args.out), ModelCheckpoint(args.out / "ckpt", save_top_k=-1)]
    if args.method.startswith("qlora"):
        mode = "int8" if args.method == "qlora-int8" else "nf4"
        callbacks.append(QuantizeBaseCallback(mode=mode, compute_dtype="fp32"))
    lora = LoRAInjectionCallback(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"], init=args.init)
    callbacks.append(lora)
    strategy: Any = "auto"
    if args.shard:
        callbacks.append(FullyShardCallback(quantized=args.quantized))
        strategy = ModelParallelStrategy(
            data_parallel_size=args.devices, tensor_parallel_size=1, save_distributed_checkpoint=args.dcp
        )
    trainer, loader = fit_toy(args, callbacks, strategy, seed_offset=1 if args.per_rank_seed else 0)
    module = trainer.lightning_module
    if args.validate:  # configure_model and the transforms run again on the sharded module
        metrics = trainer.validate(module, dataloaders=loader, verbose=False)
        torch.save(metrics, args.out / f"validate{trainer.global_rank}.pt")


if __name__ == "__main__":
    main()
