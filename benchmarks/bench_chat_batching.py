"""Useful tokens per second of the chat recipe: padded vs length-grouped vs packed batches (issue 15).

Each layout is the real ``ChatDataModule(batching=...)`` training loader over one epoch of the chatterbot
training set (SmolLM2's tokenizer and chat template, ``batch_size`` 4), at each ``max_length``. Measured:

* **padding**: the share of positions that are padding, over the whole epoch (no model needed);
* **useful tokens/s**: real (non-padding) input tokens per second of forward + backward through
  ``CausalLMTask.forward`` (the path training takes: ``position_ids`` and no mask for packed rows) of a
  random-init Llama of SmolLM2-135M's shape (``LlamaConfig``, no download). The epoch's batches of each layout
  are cut into ``--rounds`` consecutive chunks; round ``r`` runs chunk ``r`` of every layout, batch by batch
  interleaved in proportion (each layout at the same share of its chunk), so machine load hits them alike; the headline is the median over rounds of the paired ratio
  (layout tokens/s over padded tokens/s of the same round), with its min..max;
* **loss per token**: sum of the response-token losses over the number of response tokens, over the whole
  epoch. The weights stay fixed (no optimizer step), so every layout must give the padded loss: the layouts
  train on the same tokens with the same objective.

Targets (packed): padding <= 2%; useful tokens/s >= 1.1x padded at max_length 64 and >= 1.2x at 96.
``run(argv)`` returns ``{"describe", "results"}`` for ``run_all.py``: ``results[name]["times"]`` are seconds
per 1,000 useful tokens per round (lower is faster), names ``padded``/``grouped``/``packed`` for the first
``max_length`` and ``<name>@<max_length>`` for each.

Example:
    .venv/bin/python benchmarks/bench_chat_batching.py            # one full epoch, 30 layers: GPU minutes, CPU hours
    .venv/bin/python benchmarks/bench_chat_batching.py --quick    # 96 examples, 4 layers, 4 rounds: ~5 min on 2 CPUs
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lightning_adapt.data import ChatDataModule
from lightning_adapt.data.batching import IGNORE_INDEX, token_counts

LAYOUTS = {"padded": "pad", "grouped": "group_by_length", "packed": "pack"}
TARGETS = {64: 1.1, 96: 1.2}  # packed useful tokens/s over padded, per max_length
MAX_PADDING = 0.02
MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class Settings:
    """One measurement: the data (``train_size`` None: the whole training set) and the model's depth."""

    max_lengths: tuple[int, ...] = (64, 96)
    batch_size: int = 4
    train_size: int | None = None
    layers: int = 30
    rounds: int = 5
    warmup: int = 1
    threads: int = 1

    @property
    def device(self) -> torch.device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def epoch_batches(s: Settings, max_length: int) -> dict[str, list[dict[str, torch.Tensor]]]:
    """Every layout's training batches of epoch 0, from one tokenized training set."""
    base = ChatDataModule(MODEL, max_length=max_length, batch_size=s.batch_size, train_size=s.train_size, val_size=32)
    base.setup("fit")
    out = {}
    for name, batching in LAYOUTS.items():
        dm = ChatDataModule(**{**base.hparams, "batching": batching})
        dm.tokenizer, dm._splits = base.tokenizer, base._splits  # same rows; setup once
        out[name] = list(dm.train_dataloader())
    return out


def padding(batches: list[dict[str, torch.Tensor]]) -> float:
    counts = [token_counts(b) for b in batches]
    return 1 - sum(r for r, _ in counts) / sum(p for _, p in counts)


def build_task(s: Settings) -> Any:
    """``CausalLMTask`` (its forward is what training calls) on a random Llama of SmolLM2-135M's shape."""
    from transformers import AutoModelForCausalLM

    from lightning_adapt.tasks import CausalLMTask

    task = CausalLMTask(MODEL)
    config = copy.deepcopy(task.hf_config)
    config.num_hidden_layers = s.layers
    torch.manual_seed(0)
    task.model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(s.device).train()
    return task


def step(task: Any, batch: dict[str, torch.Tensor], device: torch.device) -> tuple[float, float, int]:
    """``(seconds, sum of target-token losses, targets)`` of one forward + backward."""
    batch = {k: v.to(device) for k, v in batch.items()}
    targets = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    _sync(device)
    start = time.perf_counter()
    loss = task(batch).loss
    loss.backward()
    _sync(device)
    elapsed = time.perf_counter() - start
    task.model.zero_grad(set_to_none=True)
    return elapsed, float(loss.detach()) * targets, targets


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _chunks(batches: list[Any], n: int) -> list[list[Any]]:
    size, extra = divmod(len(batches), n)
    bounds = [i * size + min(i, extra) for i in range(n + 1)]
    return [batches[a:b] for a, b in itertools.pairwise(bounds)]


def interleave(chunks: dict[str, list[Any]], first: int) -> list[tuple[str, Any]]:
    """The batches of every layout's chunk as one schedule: next comes the layout that has done the smallest
    share of its chunk (ties: rotation from ``first``), so a load spike lands on every layout alike."""
    names = list(chunks)
    names = names[first % len(names) :] + names[: first % len(names)]
    done = dict.fromkeys(names, 0)
    schedule = []
    while any(done[n] < len(chunks[n]) for n in names):
        name = min((n for n in names if done[n] < len(chunks[n])), key=lambda n: done[n] / len(chunks[n]))
        schedule.append((name, chunks[name][done[name]]))
        done[name] += 1
    return schedule


def measure(task: Any, layouts: dict[str, list[dict[str, torch.Tensor]]], s: Settings) -> dict[str, dict[str, Any]]:
    """Per layout: seconds and useful tokens per round, and the epoch's loss per token. Round ``r`` runs chunk
    ``r`` of every layout, batch by batch interleaved (:func:`interleave`)."""
    chunks = {name: _chunks(batches, s.rounds) for name, batches in layouts.items()}
    stats: dict[str, dict[str, Any]] = {n: {"seconds": [], "tokens": [], "loss": 0.0, "targets": 0} for n in layouts}
    for name in layouts:  # warm-up batches: allocator and kernels; neither timed nor counted
        for batch in layouts[name][: s.warmup]:
            step(task, batch, s.device)
    for r in range(s.rounds):
        for v in stats.values():
            v["seconds"].append(0.0)
            v["tokens"].append(0)
        for name, batch in interleave({n: c[r] for n, c in chunks.items()}, r):
            elapsed, loss, targets = step(task, batch, s.device)
            v = stats[name]
            v["seconds"][-1] += elapsed
            v["tokens"][-1] += token_counts(batch)[0]
            v["loss"], v["targets"] = v["loss"] + loss, v["targets"] + targets
        print(f"  round {r + 1}/{s.rounds}", flush=True)
    return stats


def summarize(stats: dict[str, dict[str, Any]], layouts: dict[str, list[Any]]) -> dict[str, dict[str, Any]]:
    """Each layout's padding, tokens/s, paired ratio over padded and loss per token (vs padded)."""
    rate = {n: [t / sec for t, sec in zip(v["tokens"], v["seconds"], strict=True)] for n, v in stats.items()}
    loss = {n: v["loss"] / v["targets"] for n, v in stats.items()}
    out = {}
    for name, v in stats.items():
        ratios = [a / b for a, b in zip(rate[name], rate["padded"], strict=True)]
        out[name] = {
            "times": [1000 * sec / t for t, sec in zip(v["tokens"], v["seconds"], strict=True)],
            "info": {
                "padding": padding(layouts[name]),
                "batches": len(layouts[name]),
                "tokens_per_s": statistics.median(rate[name]),
                "ratio": statistics.median(ratios),
                "ratio_range": (min(ratios), max(ratios)),
                "loss_per_token": loss[name],
                "loss_rel_diff": abs(loss[name] - loss["padded"]) / loss["padded"],
                "targets": v["targets"],
            },
        }
    return out


def describe(s: Settings) -> str:
    data = "the whole training set" if s.train_size is None else f"{s.train_size} training examples"
    return (
        f"chat batching: one epoch of {data} (chatterbot-corpus, {MODEL} template), batch_size {s.batch_size}, "
        f"max_length {', '.join(map(str, s.max_lengths))}; random Llama of SmolLM2-135M's shape with {s.layers} "
        f"layers, fp32 forward+backward on {s.device.type} ({s.threads} thread(s)), {s.rounds} interleaved rounds"
    )


def parse(argv: Sequence[str] | None) -> Settings:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--quick", action="store_true", help="96 examples, 4 layers, 4 rounds (a CPU-sized check)")
    p.add_argument("--max-lengths", default="64,96")
    p.add_argument("--train-size", type=int, default=None, help="training examples (default: all)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 30, SmolLM2-135M's)")
    p.add_argument("--rounds", "--reps", type=int, default=None, help="interleaved rounds (default 5)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    args, _ = p.parse_known_args(argv)  # run_all.py hands every script its options
    quick = {"train_size": 96, "layers": 4, "rounds": 4} if args.quick else {}
    chosen = {k: getattr(args, k) for k in ("train_size", "layers", "rounds") if getattr(args, k) is not None}
    lengths = tuple(int(x) for x in args.max_lengths.split(","))
    return Settings(max_lengths=lengths, warmup=args.warmup, threads=args.threads, **{**quick, **chosen})


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Measure once: ``{"describe": str, "results": {name: {"times", "info"}}}`` (what ``run_all.py`` reads)."""
    s = parse(argv)
    if s.threads:
        torch.set_num_threads(s.threads)
    print(describe(s), flush=True)
    task = build_task(s)
    results: dict[str, Any] = {}
    for max_length in s.max_lengths:
        print(f"max_length {max_length}", flush=True)
        layouts = epoch_batches(s, max_length)
        summary = summarize(measure(task, layouts, s), layouts)
        results.update({f"{name}@{max_length}": value for name, value in summary.items()})
        if max_length == s.max_lengths[0]:
            results.update(summary)
    return {"describe": describe(s), "results": results}


def table(results: dict[str, Any], s: Settings) -> str:
    rows = [
        "| max_length | batching | batches | padding | useful tokens/s | × padded (median, min..max) | loss/token "
        "| target | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for max_length in s.max_lengths:
        for name in LAYOUTS:
            i = results[f"{name}@{max_length}"]["info"]
            low, high = i["ratio_range"]
            target, verdict, goal = "", "", TARGETS.get(max_length, 1.0)
            if name == "packed":
                target = f"padding ≤ {MAX_PADDING:.0%}, ≥ {goal}×"
                verdict = "PASS" if i["padding"] <= MAX_PADDING and i["ratio"] >= goal else "FAIL"
                verdict += " (range straddles the target)" if low < goal <= high else ""
            rows.append(
                f"| {max_length} | {LAYOUTS[name]} | {i['batches']} | {i['padding']:.2%} | {i['tokens_per_s']:.1f} | "
                f"{i['ratio']:.3f} ({low:.3f}..{high:.3f}) | {i['loss_per_token']:.6f} (Δ {i['loss_rel_diff']:.1e}) | "
                f"{target} | {verdict} |"
            )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> None:
    s = parse(argv)
    print(table(run(argv)["results"], s))


if __name__ == "__main__":
    main()
