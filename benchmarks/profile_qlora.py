"""Per-op profile of one QLoRA training step: ours vs the PEFT + bitsandbytes reference, side by side.

The models are exactly those of ``bench_qlora.py`` (``ours-bf16`` vs ``peft`` with ``--compute bf16``;
``ours`` vs ``peft`` with ``--compute fp32``, fp32 model and fp32 4-bit compute on both sides). Both live
in this one process (``--threads``, default 1); after ``--warmup`` untimed steps each, profiled steps
alternate (ours, peft, ours, peft, ...) so load drifts hit both alike. A step is forward + backward +
``AdamW.step`` + ``zero_grad``, each under ``torch.profiler`` (CPU activities, no shapes or stacks).

Printed per compute dtype: the median wall time of a profiled step of each side, then a table of
*self* CPU time per op (ms per step, averaged over the profiled steps), sorted by ``ours - peft``, so the
top rows are where ours spends time the reference does not and the bottom rows the reverse. Op counts
per step are printed too: an op that one side calls more often is usually the finding.

Example:
    .venv/bin/python benchmarks/profile_qlora.py                  # both compute dtypes, 3 profiled steps each
    .venv/bin/python benchmarks/profile_qlora.py --compute fp32 --steps 5 --top 30
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # no profiler start/stop lines per step
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lora import Settings, describe
from bench_qlora import contenders_for, settings


@dataclasses.dataclass
class Side:
    """One contender's model, optimizer and batch, plus its accumulated per-op profile."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    ids: torch.Tensor
    self_us: dict[str, float] = dataclasses.field(default_factory=lambda: defaultdict(float))
    calls: dict[str, int] = dataclasses.field(default_factory=lambda: defaultdict(int))
    walls: list[float] = dataclasses.field(default_factory=list)

    def step(self) -> None:
        loss = self.model(input_ids=self.ids, labels=self.ids).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def profiled_step(self) -> None:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            self.step()
            self.walls.append(time.perf_counter() - start)
        for event in prof.key_averages():
            self.self_us[event.key] += event.self_cpu_time_total
            self.calls[event.key] += event.count


def build_side(name: str, s: Settings) -> Side:
    model, _ = contenders_for(s)[name](s)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(s.seed + 1)
    ids = torch.randint(0, s.vocab, (s.batch, s.seq), generator=generator)
    return Side(name, model, torch.optim.AdamW(params, lr=s.lr), ids)


def compare(ours: Side, ref: Side, steps: int, top: int) -> str:
    """The side-by-side table: self ms/step and calls/step of each op, sorted by ours - reference."""
    keys = set(ours.self_us) | set(ref.self_us)
    rows = sorted(keys, key=lambda k: ref.self_us.get(k, 0.0) - ours.self_us.get(k, 0.0))
    shown = rows[:top] + (["..."] if len(rows) > 2 * top else []) + rows[max(top, len(rows) - top) :]
    lines = [f"{'op':<56} {ours.name + ' ms':>12} {ref.name + ' ms':>10} {'diff ms':>9} {'calls':>13}"]
    for key in shown:
        if key == "...":
            lines.append("...")
            continue
        a, b = ours.self_us.get(key, 0.0) / steps / 1e3, ref.self_us.get(key, 0.0) / steps / 1e3
        calls = f"{ours.calls.get(key, 0) // steps}/{ref.calls.get(key, 0) // steps}"
        lines.append(f"{key[:56]:<56} {a:>12.2f} {b:>10.2f} {a - b:>+9.2f} {calls:>13}")
    total_a, total_b = sum(ours.self_us.values()) / steps / 1e3, sum(ref.self_us.values()) / steps / 1e3
    lines.append(f"{'total self CPU':<56} {total_a:>12.1f} {total_b:>10.1f} {total_a - total_b:>+9.1f}")
    return "\n".join(lines)


def profile_pair(argv: list[str], warmup: int, steps: int, top: int) -> None:
    s, _ = settings(argv)
    if s.threads:
        torch.set_num_threads(s.threads)
    ours_name = "ours-bf16" if s.extra["compute"] == "bf16" else "ours"
    print(f"\n== compute {s.extra['compute']}: {ours_name} vs peft; {describe(s)}", flush=True)
    ours, ref = build_side(ours_name, s), build_side("peft", s)
    for _ in range(warmup):
        ours.step()
        ref.step()
    for i in range(steps):
        for side in (ours, ref) if i % 2 == 0 else (ref, ours):
            side.profiled_step()
    wall_a, wall_b = statistics.median(ours.walls), statistics.median(ref.walls)
    print(
        f"profiled step wall time (median of {steps}): {ours_name} {wall_a:.3f} s, peft {wall_b:.3f} s, ratio {wall_a / wall_b:.3f}"
    )
    print(compare(ours, ref, steps, top), flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--compute", choices=["bf16", "fp32", "both"], default="both")
    parser.add_argument("--warmup", type=int, default=2, help="unprofiled steps per side first")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps per side")
    parser.add_argument("--top", type=int, default=20, help="rows shown at each end of the table")
    args, rest = parser.parse_known_args(argv)
    for compute in ("bf16", "fp32") if args.compute == "both" else (args.compute,):
        profile_pair([*rest, "--compute", compute], args.warmup, args.steps, args.top)


if __name__ == "__main__":
    main()
