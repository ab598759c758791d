"""Training-step benchmark: lightning-adapt LoRA vs PEFT LoRA vs full fine-tuning, one run.

Every contender gets the same randomly initialised ``LlamaForCausalLM`` (``transformers.LlamaConfig``,
same seed, no download), the same token batch and the same LoRA targets, and lives in its **own
worker process**, so its peak memory is its own. The parent then drives the workers in interleaved
rounds (A B C, B C A, C A B, ...): one training step (forward + backward + AdamW step + zero_grad) per
worker per round. Machine load therefore hits every contender alike, and the medians are compared as
ratios measured in the same run.

Measured per contender: median step time, peak memory during training (CUDA: ``max_memory_allocated``;
CPU: the process's peak resident set ``VmHWM``, reset after setup), trainable parameters, optimizer
state bytes, and the first-step loss (ours and PEFT must agree: a fresh adapter is the identity).

Example:
    .venv/bin/python benchmarks/bench_lora.py                      # ~134M-param Llama, seq 256, batch 1
    .venv/bin/python benchmarks/bench_lora.py --targets all-linear --reps 9
"""

from __future__ import annotations

import argparse
import importlib
import multiprocessing as mp
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from _models import llama_config as shared_llama_config

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
# imported by every worker before its baseline RSS is read, so library code is not counted as a contender's
PRELOAD = ("transformers", "peft", "lightning_adapt.adapters.inject")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Settings:
    """One benchmark configuration, shared by every contender (the fairness contract)."""

    hidden: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 2048
    vocab: int = 32000
    seq: int = 256
    batch: int = 1
    dtype: str = "auto"  # model dtype; auto: bf16 on CUDA, fp32 on CPU
    targets: tuple[str, ...] | str = ATTENTION
    r: int = 16
    alpha: float = 32.0
    lr: float = 1e-4
    seed: int = 0
    # torch CPU threads per worker (0 = torch's default). 1: on shared cores, multi-thread steps stall at
    # OpenMP barriers whenever another process holds a core, which makes timings bimodal.
    threads: int = 1
    extra: dict[str, Any] = field(default_factory=dict)  # per-script options (bench_qlora)

    @property
    def device(self) -> torch.device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.device.type == "cuda" else torch.float32
        return DTYPES[self.dtype]


# --------------------------------------------------------------------------- model and contenders


def llama_config(s: Settings) -> Any:
    return shared_llama_config(s.hidden, s.intermediate, s.layers, s.heads, s.vocab, s.seq)


def build_llama(s: Settings, dtype: torch.dtype | None = None) -> nn.Module:
    """The random-init model every contender starts from: same config, same seed, same weights."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(s.seed)
    model = LlamaForCausalLM(llama_config(s)).to(dtype or s.torch_dtype)
    model.config.use_cache = False
    return model


def peft_targets(s: Settings) -> str | list[str]:
    return s.targets if isinstance(s.targets, str) else list(s.targets)


def ours_lora(s: Settings) -> tuple[nn.Module, dict[str, float]]:
    from lightning_adapt.adapters.inject import LoRASpec, inject_lora

    model = build_llama(s)
    inject_lora(model, LoRASpec(r=s.r, alpha=s.alpha, dropout=0.0, target_modules=peft_targets(s)))
    return model, {}


def _compiled(s: Settings, scope: str) -> tuple[nn.Module, dict[str, float]]:
    """``ours`` compiled in place (``compile_adapted``); compiled here, by one untimed forward and backward on the
    benchmark's batch with no optimizer step, so that neither the compile time nor its memory is a step's."""
    from lightning_adapt.adapters.compiled import compile_adapted

    model, _ = ours_lora(s)
    model.to(s.device).train()
    compile_adapted(model, scope)  # type: ignore[arg-type]
    ids = torch.randint(0, s.vocab, (s.batch, s.seq), generator=torch.Generator().manual_seed(s.seed + 1))
    ids = ids.to(s.device)
    start = time.perf_counter()
    model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)
    return model, {"compile_s": time.perf_counter() - start}


def ours_compiled(s: Settings) -> tuple[nn.Module, dict[str, float]]:
    """``ours`` with every decoder block compiled (``lora: compile: blocks``, regional compilation)."""
    return _compiled(s, "blocks")


def ours_compiled_model(s: Settings) -> tuple[nn.Module, dict[str, float]]:
    """``ours`` with the whole model's forward compiled, loss included (``compile: model``; minutes to compile)."""
    return _compiled(s, "model")


def peft_lora(s: Settings) -> tuple[nn.Module, dict[str, float]]:
    from peft import LoraConfig, get_peft_model

    model = build_llama(s)
    config = LoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=0.0, target_modules=peft_targets(s), bias="none")
    return get_peft_model(model, config), {}


def full_finetune(s: Settings) -> tuple[nn.Module, dict[str, float]]:
    return build_llama(s), {}


def frozen_floor(model: nn.Module) -> nn.Module:
    """The floor of any adapter on ``model``: every weight frozen, no adapter at all, and the embeddings' output
    made to require grad, so that backward still computes every layer's input gradient (what adapters in every
    block need) and nothing else. An adapter implementation costs at least this step; a ratio target below
    ``floor / reference`` cannot be met by any adapter code at these settings. (Pessimistic by three matmuls a
    step: the first block's q/k/v input gradient, which adapters there do not need.)"""
    model.requires_grad_(False)
    model.get_input_embeddings().register_forward_hook(lambda _m, _args, out: out.requires_grad_(True))
    return model


def floor(s: Settings) -> tuple[nn.Module, dict[str, float]]:
    """The frozen base without adapters (``frozen_floor``): the lower bound of every LoRA contender's step."""
    return frozen_floor(build_llama(s)), {}


def ours_dora(s: Settings) -> tuple[nn.Module, dict[str, float]]:
    from lightning_adapt.adapters.inject import LoRASpec, inject_lora

    model = build_llama(s)
    dropout = s.extra.get("dora_dropout", 0.0)
    inject_lora(model, LoRASpec(r=s.r, alpha=s.alpha, dropout=dropout, target_modules=peft_targets(s), use_dora=True))
    return model, {}


def peft_dora(s: Settings) -> tuple[nn.Module, dict[str, float]]:
    from peft import LoraConfig, get_peft_model

    model = build_llama(s)
    dropout = s.extra.get("dora_dropout", 0.0)
    targets = peft_targets(s)
    config = LoraConfig(
        r=s.r, lora_alpha=s.alpha, lora_dropout=dropout, target_modules=targets, bias="none", use_dora=True
    )
    return get_peft_model(model, config), {}


Builder = Callable[[Settings], tuple[nn.Module, dict[str, float]]]
#: run when named in --only: fusion off, compiled blocks (``lora: compile: blocks``), the compiled whole model
OPTIONAL: dict[str, Builder] = {
    "ours-compiled": ours_compiled,
    "ours-compiled-model": ours_compiled_model,
    "floor": floor,
}
#: added by --dora (DoRA on the same targets; --dora-dropout on both sides)
DORA: dict[str, Builder] = {"ours-dora": ours_dora, "peft-dora": peft_dora}

# --------------------------------------------------------------------------- memory probes


def _status_kib(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def current_rss() -> int:
    """Resident bytes now (Linux ``VmRSS``; elsewhere the peak, the best available)."""
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else peak_rss()


def peak_rss() -> int:
    """Peak resident bytes since the last :func:`reset_peak_rss` (Linux ``VmHWM``) or process start."""
    kib = _status_kib("VmHWM")
    if kib is None:  # macOS reports bytes, Linux KiB
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // (1024 if sys.platform == "darwin" else 1)
    return kib * 1024


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux ``clear_refs`` 5). False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()


def peak_bytes(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss()


def tensor_bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(tensor_bytes(state.values()) for state in optimizer.state.values())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- worker process


def worker(name: str, build: Builder, s: Settings, conn: Connection) -> None:
    """Build one contender, then run one timed training step per ``"step"`` message."""
    if s.threads:
        torch.set_num_threads(s.threads)
    device = s.device
    for module in (*PRELOAD, *s.extra.get("preload", ())):
        importlib.import_module(module)
    rss_start = current_rss()
    model, info = build(s)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params or [torch.zeros(1, requires_grad=True)], lr=s.lr)  # floor: no params
    generator = torch.Generator().manual_seed(s.seed + 1)
    ids = torch.randint(0, s.vocab, (s.batch, s.seq), generator=generator).to(device)
    setup_bytes = current_rss() if device.type == "cpu" else torch.cuda.memory_allocated(device)
    reset_peak(device)
    conn.send("ready")
    first_loss = None
    cpu_times: list[float] = []  # this process's CPU seconds per step: blind to time spent preempted by others
    while conn.recv() == "step":
        sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        elapsed = time.perf_counter() - start
        cpu_times.append(time.process_time() - cpu_start)
        first_loss = loss.item() if first_loss is None else first_loss
        conn.send(elapsed)
    info.update(
        trainable=sum(p.numel() for p in params),
        optimizer_state_bytes=optimizer_state_bytes(optimizer),
        trainable_bytes=tensor_bytes(params),
        setup_bytes=setup_bytes,
        peak_bytes=peak_bytes(device),
        baseline_rss=rss_start,
        first_loss=first_loss or float("nan"),
    )
    if device.type == "cpu":
        info["cpu_times"] = cpu_times  # type: ignore[assignment]
    conn.send(info)


@dataclass
class Result:
    name: str
    times: list[float]
    info: dict[str, float]

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def run_interleaved(contenders: dict[str, Builder], s: Settings, warmup: int, reps: int) -> dict[str, Result]:
    """Start one worker per contender, then step them in rotating order; return the timed results."""
    ctx = mp.get_context("spawn")
    links: dict[str, tuple[Any, Connection]] = {}
    for name, build in contenders.items():  # built one after another: setup peaks do not overlap
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=worker, args=(name, build, s, child), daemon=True)
        proc.start()
        if parent.recv() != "ready":
            raise RuntimeError(f"worker {name} failed to start")
        links[name] = (proc, parent)
        print(f"  built {name}", flush=True)
    names = list(contenders)
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(warmup + reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]  # rotate: no contender always first
        for name in order:
            links[name][1].send("step")
            elapsed = links[name][1].recv()
            if rep >= warmup:
                times[name].append(elapsed)
        print(f"  round {rep + 1}/{warmup + reps}" + (" (warmup)" if rep < warmup else ""), flush=True)
    results = {}
    for name, (proc, conn) in links.items():
        conn.send("stop")
        results[name] = Result(name, times[name], conn.recv())
        proc.join()
    return results


# --------------------------------------------------------------------------- report


def mb(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def table(results: dict[str, Result]) -> str:
    w = max([10, *(len(name) for name in results)])
    header = f"{'contender':<{w}} {'step s (median)':>16} {'min..max':>14} {'peak mem':>14} {'above base':>12} {'trainable':>13} {'opt state':>12} {'1st loss':>9}"
    rows = [header]
    for r in results.values():
        i = r.info
        rows.append(
            f"{r.name:<{w}} {r.median:>16.3f} {min(r.times):>6.2f}..{max(r.times):<6.2f} {mb(i['peak_bytes']):>14} "
            f"{mb(i['peak_bytes'] - i['baseline_rss']):>12} "
            f"{int(i['trainable']):>13,} {mb(i['optimizer_state_bytes']):>12} {i['first_loss']:>9.4f}"
        )
    return "\n".join(rows)


def ratio_line(results: dict[str, Result], num: str, den: str, target: float | None) -> str:
    a, b = results[num], results[den]
    time_ratio = a.median / b.median
    per_rep = sorted(x / y for x, y in zip(a.times, b.times, strict=True))  # same round: same load
    paired = statistics.median(per_rep)
    mem_ratio = a.info["peak_bytes"] / b.info["peak_bytes"]
    above = (a.info["peak_bytes"] - a.info["baseline_rss"]) / (b.info["peak_bytes"] - b.info["baseline_rss"])
    verdict = "" if target is None else ("  PASS" if paired <= target else "  FAIL") + f" (target <= {target})"
    if target is not None and per_rep[0] <= target < per_rep[-1]:
        verdict += "; the per-round range straddles the target: not resolved at this noise, add --reps"
    return (
        f"{num}/{den}: step time {paired:.3f} (median of per-round ratios; range {per_rep[0]:.3f}..{per_rep[-1]:.3f}; "
        f"ratio of medians {time_ratio:.3f}){cpu_ratio(a, b)}, peak memory {mem_ratio:.3f} ({above:.3f} above "
        f"imports){verdict}"
    )


def cpu_ratio(a: Result, b: Result) -> str:
    """The paired ratio of the workers' own CPU seconds per step (CPU only; the timed rounds): less noisy than
    wall time on shared cores, where a step's wall time includes the time another process held the core."""
    if "cpu_times" not in a.info or "cpu_times" not in b.info:
        return ""
    n = len(a.times)
    cpu_a, cpu_b = a.info["cpu_times"][-n:], b.info["cpu_times"][-n:]  # type: ignore[index]
    per_rep = sorted(x / y for x, y in zip(cpu_a, cpu_b, strict=True))
    return f"; CPU time {statistics.median(per_rep):.3f} ({per_rep[0]:.3f}..{per_rep[-1]:.3f})"


def describe(s: Settings) -> str:
    import transformers
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        n_params = sum(p.numel() for p in LlamaForCausalLM(llama_config(s)).parameters())
    return (
        f"Llama hidden={s.hidden} layers={s.layers} heads={s.heads} ffn={s.intermediate} vocab={s.vocab} "
        f"({n_params / 1e6:.1f}M params), seq={s.seq} batch={s.batch}, dtype={s.torch_dtype}, "
        f"targets={s.targets}, r={s.r} alpha={s.alpha}; device={s.device}, threads={s.threads or torch.get_num_threads()}; "
        f"torch {torch.__version__}, transformers {transformers.__version__}"
    )


def parse_settings(argv: Sequence[str] | None, description: str) -> tuple[Settings, argparse.Namespace]:
    defaults = Settings()
    parser = argparse.ArgumentParser(description=description)
    for name in ("hidden", "layers", "heads", "intermediate", "vocab", "seq", "batch", "r", "seed", "threads"):
        parser.add_argument(f"--{name}", type=int, default=getattr(defaults, name))
    parser.add_argument("--alpha", type=float, default=defaults.alpha)
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default=defaults.dtype)
    parser.add_argument("--targets", default=",".join(ATTENTION), help="comma-separated leaf names, or all-linear")
    parser.add_argument("--only", default="", help="comma-separated subset of the contenders to run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds (first step allocates state)")
    parser.add_argument("--reps", type=int, default=7, help="timed rounds; medians of these are compared")
    parser.add_argument("--dora", action="store_true", help="add the contenders ours-dora and peft-dora")
    parser.add_argument("--dora-dropout", type=float, default=0.0, help="adapter dropout of the DoRA contenders")
    args, _ = parser.parse_known_args(argv)
    targets: tuple[str, ...] | str = args.targets if args.targets == "all-linear" else tuple(args.targets.split(","))
    fields = {k: getattr(args, k) for k in ("hidden", "layers", "heads", "intermediate", "vocab", "seq", "batch")}
    settings = Settings(
        **fields, r=args.r, alpha=args.alpha, seed=args.seed, threads=args.threads, dtype=args.dtype, targets=targets,
        extra={"dora_dropout": args.dora_dropout},
    )  # fmt: skip
    return settings, args


def select(contenders: dict[str, Builder], only: str) -> dict[str, Builder]:
    names = [n for n in only.split(",") if n] or list(contenders)
    unknown = sorted(set(names) - set(contenders))
    if unknown:
        raise SystemExit(f"--only: unknown contender(s) {unknown}; choose from {list(contenders)}")
    return {n: contenders[n] for n in names}


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Measure once; ``{"describe": str, "results": {name: Result}}`` (what ``run_all.py`` reads)."""
    s, args = parse_settings(argv, __doc__.splitlines()[0] if __doc__ else "")
    print(describe(s))
    contenders: dict[str, Builder] = {"ours": ours_lora, "peft": peft_lora, "full": full_finetune}
    contenders.update(DORA if args.dora else {})
    contenders.update(OPTIONAL if args.only else {})  # opt-in: by name with --only
    results = run_interleaved(select(contenders, args.only), s, args.warmup, args.reps)
    return {"describe": describe(s), "results": results}


def main(argv: Sequence[str] | None = None) -> None:
    results: dict[str, Result] = run(argv)["results"]
    print(table(results))
    pairs = (
        ("ours", "peft", 0.9),
        ("ours", "full", 0.7),
        ("peft", "full", None),
        ("ours-dora", "peft-dora", 0.8),
        ("ours-compiled", "ours", 0.85),
        ("ours-compiled-model", "ours", 0.85),
        ("ours-compiled", "peft", None),
        ("ours-compiled-model", "peft", None),
    )
    for num, den, target in pairs:
        if num in results and den in results:
            print(ratio_line(results, num, den, target))
    if "ours" in results and "peft" in results:
        same = abs(results["ours"].info["first_loss"] - results["peft"].info["first_loss"]) < 1e-4
        print(f"first-step loss ours == peft (fresh adapter is the identity): {same}")
    for name in ("ours-compiled", "ours-compiled-model"):
        if name in results and "ours" in results:
            info, ours = results[name].info, results["ours"].info
            compiled = f"; compiled in {info['compile_s']:.0f} s (setup, untimed)" if "compile_s" in info else ""
            print(f"first-step loss {name} - ours: {info['first_loss'] - ours['first_loss']:+.2e}{compiled}")


if __name__ == "__main__":
    main()
