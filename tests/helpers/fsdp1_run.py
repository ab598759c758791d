"""QLoRA under FSDP1 (``FullyShardedDataParallel``) with the wrap policy and 4-bit storage that
``lightning_adapt.callbacks._fsdp1`` gives Lightning's ``FSDPStrategy``, for tests/distributed/test_fsdp1.py.

Lightning refuses ``FSDPStrategy`` without CUDA, but torch's FSDP1 itself runs on CPU over gloo, so this script
wraps the adapted model directly, as ``FSDPStrategy._setup_model`` does::

    python tests/helpers/fsdp1_run.py --devices 2 --out OUT [--dtype bf16]

Each rank trains on its own contiguous slice of every global batch; ``OUT/rank<r>.pt`` holds its losses, the
full adapter values after training, the logits of the first batch before training and the local bytes of the
frozen flat parameters (the base, 4-bit codes included).
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import MixedPrecision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the helpers package when run as a script

from helpers.toy import tiny_llama
from lightning_adapt.adapters.inject import LoRASpec, inject_lora
from lightning_adapt.callbacks._fsdp1 import fsdp1_quant_storage, fsdp1_wrap_policy
from lightning_adapt.quantize import QuantConfig, quantize_model

GLOBAL_BATCH, SEQ, STEPS = 4, 12, 3
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build(dtype: torch.dtype) -> torch.nn.Module:
    """The tiny Llama as QLoRA builds it under FSDP1: base in ``dtype``, codes stored in ``dtype``, fp32 adapters."""
    model = tiny_llama().to(dtype)
    storage = fsdp1_quant_storage("nf4", torch.uint8, dtype)
    quantize_model(model, QuantConfig(mode="nf4", double_quant=True, compute_dtype=dtype, quant_storage=storage))
    torch.manual_seed(1)
    inject_lora(model, LoRASpec(r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj")))
    return model


def batches(world: int, rank: int) -> list[torch.Tensor]:
    tokens = torch.randint(0, 100, (STEPS * GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(2))
    local = GLOBAL_BATCH // world
    return [tokens[b + rank * local : b + (rank + 1) * local] for b in range(0, len(tokens), GLOBAL_BATCH)]


def train(model: torch.nn.Module, steps: list[torch.Tensor]) -> dict[str, Any]:
    """AdamW steps of next-token loss over ``steps``: the losses and the first batch's logits."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    record: dict[str, Any] = {"losses": []}
    for step, tokens in enumerate(steps):
        logits = model(tokens).logits
        if step == 0:
            record["logits"] = logits.detach().float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        record["losses"].append(float(loss))
    return record


def frozen_local_bytes(model: FSDP) -> int:
    """Bytes of the frozen flat parameters this rank keeps between steps (its shard)."""
    total = 0
    for unit in FSDP.fsdp_modules(model):
        handle = unit._handle
        if handle is not None and not handle.flat_param.requires_grad:
            total += handle.flat_param.numel() * handle.flat_param.element_size()  # sharded at construction
    return total


def train_rank(rank: int, world: int, dtype: torch.dtype) -> dict[str, Any]:
    """Build, wrap and train this rank's model; its record. The FSDP objects die with this frame (their hook
    cycles in :func:`run`'s collection), so nothing of the model outlives the process group."""
    model = build(dtype)
    precision = MixedPrecision(param_dtype=dtype, reduce_dtype=dtype, buffer_dtype=dtype)
    wrapped = FSDP(
        model, auto_wrap_policy=fsdp1_wrap_policy(model), use_orig_params=True, mixed_precision=precision,
        device_id=torch.device("cpu"),
    )  # fmt: skip
    record = {**train(wrapped, batches(world, rank)), "frozen_bytes": frozen_local_bytes(wrapped)}
    with FSDP.summon_full_params(wrapped):
        record["adapters"] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return record


def run(rank: int, world: int, rendezvous: str, out: Path, dtype: torch.dtype) -> None:
    """One rank. The rendezvous is a file (no TCP port picked ahead and no TCPStore server on rank 0 that the
    other rank needs until its end), and teardown is ordered on every path while the interpreter is fully
    alive: the ranks meet at a barrier (none closes its gloo connections while another still uses them), the
    model's reference cycles are collected, then the process group is destroyed before the process exits."""
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        torch.save(train_rank(rank, world, dtype), out / f"rank{rank}.pt")
        dist.barrier()
    finally:
        gc.collect()
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:  # a fresh rendezvous file per run
        rendezvous = str(Path(tmp) / "rendezvous")
        mp.spawn(run, args=(args.devices, rendezvous, args.out, DTYPES[args.dtype]), nprocs=args.devices, join=True)


if __name__ == "__main__":
    main()
