"""A streamed export of tests/reliability/test_crash_safety.py's base, slowed down so that a SIGKILL lands inside it.

    python tests/helpers/export_kill_run.py BASE OUT STARTED ADAPTER_SEED [--die-at-commit exchange|fallback]
                                    [--hold-until FILE] [--ready FILE]

Every tensor read sleeps 50 ms (and touches STARTED); with ``--hold-until`` the first read also waits until FILE
exists, and ``--ready`` touches FILE just before the export starts (two racing exports meet for certain). ``--die-at-commit exchange`` SIGKILLs the process right
after the atomic exchange put the new tree in place (the old one not yet removed); ``fallback`` disables the
exchange and SIGKILLs between the fallback's two renames (the old tree moved aside, the new one not yet in
place). A refused export prints its one-line message and exits 2, as the CLI does.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import torch

from lightning_adapt import atomic
from lightning_adapt.adapters.inject import LoRASpec
from lightning_adapt.errors import ConfigError
from lightning_adapt.export.adapter_sources import adapters_from_checkpoint
from lightning_adapt.export.exporter import ExportOptions
from lightning_adapt.export.safetensors_io import StoredTensor, model_keys, read_index
from lightning_adapt.export.stream_export import export_streamed


def adapter_state(hidden: int, layers: int, seed: int) -> dict[str, torch.Tensor]:
    """Random q/v LoRA weights under a task's checkpoint keys (``model.model.layers.<i>...``)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i in range(layers):
        for name in ("q_proj", "v_proj"):
            key = f"model.model.layers.{i}.self_attn.{name}"
            state[key + ".lora_A.weight"] = torch.randn(8, hidden, generator=g) * 0.1
            state[key + ".lora_B.weight"] = torch.randn(hidden, 8, generator=g) * 0.1
    return state


def _slow_reads(started: Path, hold_until: Path | None) -> None:
    read = StoredTensor.read

    def slow(self: StoredTensor) -> torch.Tensor:
        started.touch()
        while hold_until is not None and not hold_until.exists():
            time.sleep(0.01)
        time.sleep(0.05)
        return read(self)

    StoredTensor.read = slow  # type: ignore[method-assign]


def _die_at_commit(how: str) -> None:
    replace, exchange = os.replace, atomic._exchange

    def kill() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def exchange_then_die(a: Path, b: Path) -> bool:
        assert exchange(a, b), "this file system swaps directories atomically"
        kill()
        return True

    def replace_then_die(a: str | Path, b: str | Path) -> None:
        replace(a, b)
        if ".old-" in str(b):  # the previous tree was moved aside
            kill()

    if how == "exchange":
        atomic._exchange = exchange_then_die
    else:
        atomic._exchange = lambda a, b: False
        atomic.os.replace = replace_then_die  # type: ignore[attr-defined]


def main() -> None:
    base, out, started, seed = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
    flag = {k: Path(sys.argv[sys.argv.index(k) + 1]) for k in ("--hold-until", "--ready") if k in sys.argv}
    _slow_reads(started, flag.get("--hold-until"))
    if "--die-at-commit" in sys.argv:
        _die_at_commit(sys.argv[sys.argv.index("--die-at-commit") + 1])
    keys = model_keys(read_index(base))
    adapters = adapters_from_checkpoint(adapter_state(64, 4, seed), keys, LoRASpec(8, 16.0))
    if "--ready" in flag:
        flag["--ready"].touch()
    try:  # bf16: every tensor is read and cast (else most are copied file to file)
        export_streamed(base, out, adapters, ExportOptions("original", "bf16", overwrite=True), keys=keys)
    except ConfigError as err:
        print(f"lightning-adapt: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
