"""Loading benchmark: quantize-while-loading (``lightning_adapt.loading``) vs transformers' bitsandbytes loader.

A random Llama-shaped bf16 checkpoint (default: TinyLlama's shape, 1.1B parameters) is written tensor by
tensor into a directory. Each contender then loads it in a fresh worker process, so each peak is its own:

- ``ours``: ``with empty_weights(): AutoModelForCausalLM.from_config(config, dtype=bf16)``, then
  ``load_pretrained(model, WeightSource(dir), plan=QuantPlan(QuantConfig("nf4", double_quant=True)),
  dtype=bf16)``;
- ``transformers``: ``AutoModelForCausalLM.from_pretrained(dir, quantization_config=BitsAndBytesConfig(
  load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
  bnb_4bit_compute_dtype=bf16), dtype=bf16)``.

Measured per worker: the peak resident memory minus the worker's baseline (RSS after its imports, before the
build), the load time, and the final weight bytes (parameters + buffers; 4-bit layers: codes + quant state).
The peak is ``VmHWM`` (``ru_maxrss`` is printed too: the parent imports no torch, so both start small; Linux
carries ``ru_maxrss`` over ``exec``, which is why a worker must not be spawned from a large process).
Checked: ``peak - baseline ≤ 1.1 × final weight bytes + largest tensor in fp32``.

Example:
    .venv/bin/python benchmarks/bench_load.py --reps 3                 # 1.1B: 2.2 GB on disk, ~6 min on 2 cores
    .venv/bin/python benchmarks/bench_load.py --layers 4 --dir /tmp/ckpt --keep
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _models import write_random_llama

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "RESULTS-load.md"
CONTENDERS = ("ours", "transformers")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--dir", type=Path, default=None, help="checkpoint directory (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint; reuse it if it exists")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", default=",".join(CONTENDERS))
    p.add_argument("--reps", type=int, default=1, help="rounds, contenders alternating; the median time is kept")
    p.add_argument("--no-write", action="store_true", help=f"do not write {RESULTS.name}")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- workers (own processes)


def generate(args: argparse.Namespace, path: Path) -> dict[str, Any]:
    """Write config.json + model.safetensors, one random bf16 tensor at a time (the writer streams)."""
    import torch

    from lightning_adapt.resources import peak_rss_bytes

    start = time.perf_counter()
    shapes = write_random_llama(
        path, args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads, args.vocab
    ).values()
    params = sum(torch.Size(s).numel() for s in shapes)
    largest = max(torch.Size(s).numel() for s in shapes)
    return {"params": params, "largest_fp32": 4 * largest, "seconds": time.perf_counter() - start,
            "peak": peak_rss_bytes(), "bytes": (path / "model.safetensors").stat().st_size}  # fmt: skip


def _weight_bytes(model: Any) -> int:
    from lightning_adapt.layers import quant_storage_bytes, quantized_layers

    quantized = {id(m.weight): m for _, m in quantized_layers(model)}
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()] if id(t) not in quantized}
    return sum(t.nbytes for t in tensors.values()) + sum(quant_storage_bytes(m) for m in quantized.values())


class AnonSampler:
    """Samples ``RssAnon`` (resident anonymous memory: not the page cache, not mapped file pages) every 5 ms."""

    def __init__(self) -> None:
        import threading

        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def now() -> int:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("RssAnon:"))
        return 1024 * int(line.split()[1])

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.now())

    def __enter__(self) -> AnonSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def load(contender: str, path: Path) -> dict[str, Any]:
    """Load ``path`` as ``contender`` does; every import happens before the baseline is taken."""
    import resource

    import bitsandbytes  # noqa: F401
    import torch
    import transformers.integrations.bitsandbytes
    import transformers.models.llama.modeling_llama
    import transformers.quantizers.quantizer_bnb_4bit  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

    from lightning_adapt.layers import quantized_layers
    from lightning_adapt.loading import (
        QuantPlan,
        WeightSource,
        current_rss_bytes,
        empty_weights,
        load_pretrained,
        peak_rss_bytes,
    )
    from lightning_adapt.quantize import QuantConfig

    bf16 = torch.bfloat16
    config = AutoConfig.from_pretrained(path)
    anon_baseline = AnonSampler.now()
    baseline, ru_before = current_rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with AnonSampler() as anon:
        start = time.perf_counter()
        if contender == "ours":
            with empty_weights():
                model = AutoModelForCausalLM.from_config(config, dtype=bf16)
            plan = QuantPlan(QuantConfig(mode="nf4", double_quant=True, compute_dtype=bf16))
            load_pretrained(model, WeightSource(path), plan=plan, dtype=bf16, baseline_rss=baseline)
        else:
            quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                       bnb_4bit_compute_dtype=bf16)  # fmt: skip
            model = AutoModelForCausalLM.from_pretrained(
                path, quantization_config=quant, dtype=bf16, local_files_only=True
            )
        seconds = time.perf_counter() - start
    ru_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "seconds": seconds, "baseline": baseline, "peak": peak_rss_bytes() - baseline,
        "anon_peak": anon.peak - anon_baseline,
        "ru_maxrss_peak": 1024 * ru_after - baseline, "ru_maxrss_growth": 1024 * (ru_after - ru_before),
        "final": _weight_bytes(model), "quantized_layers": len(quantized_layers(model)),
        "lm_head": type(model.lm_head).__name__,
    }  # fmt: skip


def _worker(argv: list[str]) -> None:
    import torch

    torch.set_num_threads(int(argv[2]))
    if argv[0] == "generate":
        args = parse(json.loads(argv[3]))
        print(json.dumps(generate(args, Path(argv[1]))))
    else:
        print(json.dumps(load(argv[0], Path(argv[1]))))


# --------------------------------------------------------------------------- the parent (stdlib only)


def _spawn(*argv: str) -> dict[str, Any]:
    run = subprocess.run([sys.executable, __file__, "--worker", *argv], capture_output=True, text=True, cwd=ROOT)
    if run.returncode != 0:
        raise SystemExit(f"worker {argv[0]} failed:\n{run.stderr[-4000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB"


def report(args: argparse.Namespace, ckpt: dict[str, Any], results: dict[str, dict[str, Any]]) -> str:
    shape = f"hidden {args.hidden}, {args.layers} layers, intermediate {args.intermediate}, vocab {args.vocab}"
    lines = [
        f"Checkpoint: random Llama, {ckpt['params'] / 1e9:.2f}B parameters ({shape}), bf16, one file of "
        f"{_mb(ckpt['bytes'])}; largest tensor in fp32: {_mb(ckpt['largest_fp32'])}"
        + (f"; generated in {ckpt['seconds']:.0f}s" if "seconds" in ckpt else ""),
        "",
        "| contender | load time, median (all runs) | peak RSS − baseline | final weight bytes | bound | within | ru_maxrss − baseline "
        "| peak anonymous RSS − baseline (sampled) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        bound = 1.1 * r["final"] + ckpt["largest_fp32"]
        lines.append(
            f"| {name} | {r['seconds']:.1f}s ({', '.join(map(str, r['all_seconds']))}) | {_mb(r['peak'])} | {_mb(r['final'])} | {_mb(bound)} | "
            f"{'yes' if r['peak'] <= bound else 'NO'} | {_mb(r['ru_maxrss_peak'])} | {_mb(r['anon_peak'])} |"
        )
    if len(results) == 2:
        ours, theirs = results["ours"], results["transformers"]
        lines += ["", f"ours/transformers: peak RSS {ours['peak'] / theirs['peak']:.2f}, peak anonymous RSS "
                  f"{ours['anon_peak'] / theirs['anon_peak']:.2f}, time {ours['seconds'] / theirs['seconds']:.2f}, "
                  f"final weight bytes {ours['final'] / theirs['final']:.3f}"]  # fmt: skip
    lines += [
        "",
        "Bound: peak − baseline ≤ 1.1 × final weight bytes (4-bit codes + quant state, bf16 embeddings, "
        "lm_head and norms; 10% for allocator slack) + the largest checkpoint tensor in fp32 (the one "
        "full-precision tensor in flight, and room for the temporaries of quantizing a smaller one); baseline = "
        "the worker's RSS after its imports, before the build. Peak RSS is VmHWM (ru_maxrss agrees: the "
        "parent imports no torch). It counts touched pages of memory-mapped files: transformers maps the "
        "whole checkpoint, so its RSS holds file pages the kernel may reclaim; the anonymous-memory column "
        "(RssAnon sampled every 5 ms, so it can miss short spikes) leaves them out.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    path = args.dir or Path(tempfile.mkdtemp(prefix="bench-load-"))
    path.mkdir(parents=True, exist_ok=True)
    try:
        settings = json.dumps(argv if argv is not None else sys.argv[1:])
        if (path / "model.safetensors").is_file() and args.keep:
            ckpt = _spawn("generate-info", str(path), str(args.threads), settings)
        else:
            ckpt = _spawn("generate", str(path), str(args.threads), settings)
            print(f"generated {ckpt['params'] / 1e9:.2f}B parameters in {ckpt['seconds']:.0f}s", flush=True)
        names = args.only.split(",")
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        for round_ in range(args.reps):  # alternate the order, so load from other processes hits both alike
            for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                runs[name].append(_spawn(name, str(path), str(args.threads)))
                print(f"{name}: {json.dumps(runs[name][-1])}", flush=True)
        results = {name: sorted(r, key=lambda x: x["seconds"])[len(r) // 2] for name, r in runs.items()}
        for name, r in results.items():
            r["all_seconds"] = [round(x["seconds"], 1) for x in runs[name]]
        text = report(args, ckpt, results)
        print("\n" + text)
        if not args.no_write:
            command = " ".join(["benchmarks/bench_load.py", *(argv if argv is not None else sys.argv[1:])])
            RESULTS.write_text(f"# Load benchmark\n\n`{command}` (2 shared CPU cores)\n\n{text}\n")
    finally:
        if not args.keep:
            shutil.rmtree(path, ignore_errors=True)


def _info(path: Path) -> dict[str, Any]:
    """``generate``'s numbers for an existing checkpoint, from its header."""
    import math

    with (path / "model.safetensors").open("rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    numels = [math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__"]
    return {
        "params": sum(numels),
        "largest_fp32": 4 * max(numels),
        "bytes": (path / "model.safetensors").stat().st_size,
    }


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        if sys.argv[2] == "generate-info":
            print(json.dumps(_info(Path(sys.argv[3]))))
        else:
            _worker(sys.argv[2:])
    else:
        main()
