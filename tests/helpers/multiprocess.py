"""Launch a training script as a user would (Lightning's launcher starts the other ranks) and read what each
rank recorded: shared by the DDP and FSDP2 tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

#: a fresh rendezvous: an earlier in-process run (the DDP recipe test) leaves MASTER_PORT etc. behind
_LAUNCHER = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")


def launch(script: Path, out: Path, devices: int, *extra: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER} | {"PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, str(script), "--devices", str(devices), "--out", str(out), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def ranks(out: Path, devices: int) -> list[dict[str, Any]]:
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(devices)]


def global_losses(records: list[dict[str, Any]]) -> torch.Tensor:
    return torch.tensor([r["losses"] for r in records]).mean(dim=0)  # gradients are averaged over the ranks


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)
