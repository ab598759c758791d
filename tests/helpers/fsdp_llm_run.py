"""A few LoRA/QLoRA steps of ``CausalLMTask`` on a Hugging Face directory, with ``MergeOnSaveCallback``, under
FSDP2 (``ModelParallelStrategy`` + ``FullyShardCallback``) or in one process, for tests/distributed/test_fsdp.py.

Run as a script (Lightning's launcher re-runs this file once per extra rank)::

    python tests/helpers/fsdp_llm_run.py --devices 2 --shard --model DIR --out OUT [--method qlora]

Every rank gets its own contiguous slice of each global batch of random tokens (no sampler); the export goes
to ``OUT/export``, the final adapter-only checkpoint to ``OUT/ckpt``, each rank's trained adapters to
``OUT/rank<r>.pt``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader

from lightning_adapt import LoRAInjectionCallback, MemoryReportCallback, MergeOnSaveCallback, QuantizeBaseCallback
from lightning_adapt.callbacks.shard import FullyShardCallback
from lightning_adapt.tasks.causal_lm import CausalLMTask

GLOBAL_BATCH, SEQ, STEPS = 4, 16, 3


def batches(vocab: int, world: int, rank: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (STEPS * GLOBAL_BATCH, SEQ), generator=g)
    local = GLOBAL_BATCH // world
    rows = [tokens[b + rank * local : b + (rank + 1) * local] for b in range(0, len(tokens), GLOBAL_BATCH)]
    return [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r.clone()} for r in rows]


class Record(L.Callback):
    """Each rank's gathered adapters and its memory report (per-rank measured and estimated bytes)."""

    def __init__(self, memory: MemoryReportCallback) -> None:
        self.memory = memory

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        full = {
            n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().clone()
            for n, p in pl_module.named_parameters()
            if p.requires_grad
        }
        record = {"trainable": full, "memory": self.memory.reports, "no_estimate": self.memory.no_estimate_reason}
        torch.save(record, Path(trainer.default_root_dir) / f"rank{trainer.global_rank}.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--shard", action="store_true")
    parser.add_argument("--method", choices=["lora", "qlora"], default="lora")
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    L.seed_everything(0)
    memory = MemoryReportCallback(log_metrics=False)
    callbacks: list[L.Callback] = [memory, Record(memory), ModelCheckpoint(args.out / "ckpt", save_top_k=1)]
    if args.method == "qlora":
        callbacks.append(QuantizeBaseCallback(mode="nf4", compute_dtype="fp32"))
    callbacks.append(LoRAInjectionCallback(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    callbacks.append(MergeOnSaveCallback(dirpath=str(args.out / "export")))
    strategy: Any = "auto"
    if args.shard:
        callbacks.append(FullyShardCallback())
        strategy = ModelParallelStrategy(
            data_parallel_size=args.devices, tensor_parallel_size=1, save_distributed_checkpoint=False
        )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy,
        max_steps=STEPS,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=callbacks,
        default_root_dir=args.out,
    )
    module = CausalLMTask(model_name_or_path=args.model, learning_rate=1e-2)
    data = batches(module.hf_config.vocab_size, args.devices, trainer.global_rank)
    trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=None))


if __name__ == "__main__":
    main()
