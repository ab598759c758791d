"""The whole job against TRL: ``lightning-adapt fit`` with a chat recipe vs TRL's ``SFTTrainer`` + PEFT, same work.

Both sides fine-tune SmolLM2-135M-Instruct (the packaged ``smollm2-135m-instruct``) with LoRA r=16, alpha=32, dropout
0.05 on q/k/v/o_proj, fp32, for ``--steps`` optimizer steps of the recipe's batches, then compute the loss of the
recipe's held-out rows and save one checkpoint. Every setting comes from the recipe (``recipes/chat/lora.yaml``, with
``--qlora`` ``recipes/chat/qlora.yaml``): learning rate, weight decay, warmup, batch size, ``max_length``, the LoRA
settings, the seed. What makes the work the same:

* **data**: this script takes the first ``--steps`` batches of the recipe's ``ChatDataModule`` (chatterbot-corpus
  pairs, SmolLM2's chat template, ``group_by_length`` batches, labels on assistant tokens only) and writes their rows
  in that order, pre-tokenized, as a dataset of ``input_ids`` and ``completion_mask`` (1 where the recipe keeps the
  label). TRL batches it in order (``train_sampling_strategy="sequential"``) and builds its labels from the mask.
  The TRL job refuses to train unless its first collated batch equals the recipe's exactly (ids, attention mask,
  labels); afterwards this script checks a digest of *every* training and validation batch each job saw against the
  recipe's (``lightning-adapt`` through a probe callback, TRL through its collator) and fails loudly on any
  difference;
* **optimizer**: the recipe's AdamW (``AdamW8bit`` with ``--qlora``: what ``PagedAdamW8bit`` falls back to on a CPU)
  and its schedule ``LambdaLR(min(1, (step + 1) / (warmup + 1)))``, handed to TRL's trainer; no gradient clipping,
  no gradient checkpointing, no bf16 autocast on either side (TRL's ``SFTConfig`` defaults to the last two);
* **validation loss**: on both sides the sum of ``-log p`` over every response token of the held-out rows divided by
  their count (ours: ``val_loss`` = log of torchmetrics' perplexity; TRL: its own fused loss kernel, summed; the token
  counts are checked equal);
* **checkpoint**: one at the last step on each side (adapter weights, optimizer and scheduler state); the recipe's
  ``merge`` export, memory report and prediction writer are turned off (TRL does none of them).

Each job is one process, started by this one; rounds interleave them (ours, TRL / TRL, ours / ...), so machine load
hits both alike. Measured per job:

* **whole job**: wall time from the process's start to its exit (this process's ``perf_counter`` around
  ``Popen`` and ``os.wait4``);
* **time per step**: the interval between the ends of consecutive optimizer steps (Lightning ``on_train_batch_end``,
  transformers ``on_step_end``: after the optimizer and scheduler steps), median over the steps after the first
  ``--skip``; it holds everything a step costs in each framework (data loading, collation, logging). Also the same
  in the job's own CPU seconds (``process_time``: blind to time another process held the core);
* **peak RSS**: the job's ``ru_maxrss`` as ``os.wait4`` returns it for that one child: the kernel's high-water mark
  of its resident set over its whole life (imports, model load, training, validation, checkpoint);
* the split of the whole job: process start to the end of step 1 (imports, model load, adapters, first step), the
  steps, and the end of the last step to exit (validation, checkpoint, teardown).

Ratios are ours / TRL within a round: the median over rounds with its min..max.

Example:
    .venv/bin/python benchmarks/bench_vs_trl.py                        # 20 steps, 3 rounds: ~6 min on 2 shared CPU cores
    .venv/bin/python benchmarks/bench_vs_trl.py --steps 40 --rounds 5 --results benchmarks/RESULTS.md
    .venv/bin/python benchmarks/bench_vs_trl.py --qlora               # NF4 (bitsandbytes on CPU on both sides)
    .venv/bin/python benchmarks/bench_vs_trl.py --prepare-only        # the data and the checks, no training

Needs the ``bench`` extra (``pip install -e .[bench]``: trl, peft).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.metadata
import itertools
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RECIPES = {"lora": "recipes/chat/lora.yaml", "qlora": "recipes/chat/qlora.yaml"}
IGNORE_INDEX = -100
SECTION = "## The whole job against TRL"
DIGESTED = ("input_ids", "attention_mask", "labels")
GOALS = {"step": 0.9, "peak": 0.8}  # issue 40: time per step <= 0.9 x TRL's, peak <= 0.8 x; val loss within 1 %
VAL_LOSS_TOLERANCE = 0.01


# --------------------------------------------------------------------------- what both jobs share


def batch_digest(batch: Mapping[str, Any]) -> str:
    """SHA-256 of a batch's ``input_ids``, ``attention_mask`` and ``labels`` (shapes and int64 values)."""
    h = hashlib.sha256()
    for key in DIGESTED:
        tensor = batch[key].detach().cpu().long().contiguous()
        h.update(f"{key}{tuple(tensor.shape)}".encode())
        h.update(tensor.numpy().tobytes())
    return h.hexdigest()


def response_tokens(labels: Any) -> int:
    """Tokens a causal LM's loss counts in ``labels`` (``[batch, seq]``): positions 1.. whose label is kept."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def recipe_lambda(warmup: int) -> Callable[[int], float]:
    """The learning-rate factor of ``TaskModule.configure_optimizers``: linear warmup over ``warmup`` steps, then 1."""
    return lambda step: min(1.0, (step + 1) / (warmup + 1))


def memory_now() -> dict[str, int]:
    """This process's resident set now, its anonymous and file-backed parts (a memory-mapped checkpoint is the
    latter) and its high-water mark so far (``VmRSS``, ``RssAnon``, ``RssFile``, ``VmHWM``), in bytes."""
    found = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            found[key] = int(value.split()[0]) * 1024
    return found


def start_profile() -> Any:
    """A started ``torch.profiler`` (CPU ops, with memory) for one step; :func:`stop_profile` ends it."""
    import torch

    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
    profiler.__enter__()
    return profiler


def stop_profile(profiler: Any, path: Path) -> None:
    """End ``profiler`` and write its op tables to ``path``: by self CPU time, then by memory allocated."""
    profiler.__exit__(None, None, None)
    ops = profiler.key_averages()
    by_time = ops.table(sort_by="self_cpu_time_total", row_limit=25)
    by_memory = ops.table(sort_by="self_cpu_memory_usage", row_limit=12)
    path.write_text(f"{by_time}\n\n{by_memory}\n")


@dataclass(frozen=True)
class Recipe:
    """The settings of a chat recipe both jobs use (read from its YAML)."""

    path: str
    mode: str  # lora | qlora
    lr: float
    weight_decay: float
    warmup_steps: int
    data: dict[str, Any]
    lora: dict[str, Any]
    seed: int
    log_every_n_steps: int
    double_quant: bool = False


def read_recipe(mode: str, batch_size: int | None = None) -> Recipe:
    """The recipe of ``mode``; refuses one whose settings this comparison does not reproduce on the TRL side."""
    import yaml

    path = RECIPES[mode]
    config = yaml.safe_load((ROOT / path).read_text())
    model, data = config["model"]["init_args"], dict(config["data"]["init_args"])
    lora = config["lora"]["init_args"]
    problems = []
    if model.get("activation_checkpointing"):
        problems.append("model.activation_checkpointing is on")
    if config["trainer"].get("precision") != "32-true":
        problems.append(f"trainer.precision is {config['trainer'].get('precision')} (fp32 compared: 32-true)")
    if config["trainer"].get("gradient_clip_val") or config["trainer"].get("accumulate_grad_batches", 1) != 1:
        problems.append("the trainer clips gradients or accumulates batches")
    if set(lora) - {"r", "alpha", "dropout", "target_modules"}:
        problems.append(f"lora sets {sorted(set(lora) - {'r', 'alpha', 'dropout', 'target_modules'})}")
    if problems:
        raise SystemExit(f"{path}: {'; '.join(problems)}; this comparison reproduces none of that on the TRL side")
    if batch_size is not None:
        data["batch_size"] = batch_size
    quantize = config.get("quantize", {}).get("init_args", {}) if mode == "qlora" else {}
    return Recipe(
        path=path,
        mode=mode,
        lr=float(model["learning_rate"]),
        weight_decay=float(model["weight_decay"]),
        warmup_steps=int(model["warmup_steps"]),
        data=data,
        lora=lora,
        seed=int(config.get("seed_everything", 42)),
        log_every_n_steps=int(config["trainer"].get("log_every_n_steps", 50)),
        double_quant=bool(quantize.get("double_quant", False)),
    )


# --------------------------------------------------------------------------- the data, taken from the recipe


@dataclass
class Prepared:
    """The recipe's first training batches and its validation batches, as digests, and where TRL's copy lies."""

    model_dir: Path
    data_dir: Path
    reference: Path  # the first training batch (torch.save of ids, attention mask, labels)
    train_digests: list[str]
    val_digests: list[str]
    val_tokens: int
    padding: float  # share of padded positions in the training batches


def unpadded_rows(batch: Mapping[str, Any]) -> list[dict[str, list[int]]]:
    """The rows of a right-padded batch: ``input_ids`` and ``completion_mask`` (1 where the label is kept)."""
    rows = []
    for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"], strict=True):
        n = int(mask.sum())
        if not bool(mask[:n].all()):
            raise SystemExit("a recipe batch is not right-padded; its rows cannot be handed to TRL as they are")
        rows.append({"input_ids": ids[:n].tolist(), "completion_mask": (labels[:n] != IGNORE_INDEX).long().tolist()})
    return rows


def prepare(recipe: Recipe, steps: int, work: Path, model_dir: Path | None = None) -> Prepared:
    """Set up the recipe's ``ChatDataModule`` as ``fit`` does, take its first ``steps`` training batches (epoch 0)
    and every validation batch, and write their rows in order for TRL (``datasets.save_to_disk``). ``model_dir``:
    the model TRL trains (default: the recipe's, ``smollm2-135m-instruct``); the data always uses the recipe's
    tokenizer."""
    import datasets
    import torch

    from lightning_adapt.data import ChatDataModule
    from lightning_adapt.models import resolve_model

    tokenizer_dir = resolve_model("smollm2-135m-instruct")
    model_dir = model_dir or tokenizer_dir
    dm = ChatDataModule(tokenizer=str(tokenizer_dir), **recipe.data)
    dm.setup("fit")
    train = []
    for batch in dm.train_dataloader():
        train.append(batch)
        if len(train) == steps:
            break
    if len(train) < steps or any(len(b["input_ids"]) != dm.batch_size for b in train):
        raise SystemExit(f"--steps {steps}: the recipe's first epoch has fewer full batches of {dm.batch_size}")
    val = list(dm.val_dataloader())
    data_dir = work / "trl-data"
    for name, batches in (("train", train), ("val", val)):
        rows = [row for batch in batches for row in unpadded_rows(batch)]
        datasets.Dataset.from_list(rows).save_to_disk(str(data_dir / name))
    reference = work / "first-batch.pt"
    torch.save({k: train[0][k] for k in DIGESTED}, reference)
    for weights in model_dir.glob("*.safetensors"):  # in the page cache before the first job: no job reads it cold
        weights.read_bytes()
    positions = sum(b["attention_mask"].numel() for b in train)
    return Prepared(
        model_dir=model_dir,
        data_dir=data_dir,
        reference=reference,
        train_digests=[batch_digest(b) for b in train],
        val_digests=[batch_digest(b) for b in val],
        val_tokens=sum(response_tokens(b["labels"]) for b in val),
        padding=1 - sum(int(b["attention_mask"].sum()) for b in train) / positions,
    )


# --------------------------------------------------------------------------- the two jobs


def ours_command(recipe: Recipe, steps: int, out: Path, profile_step: int | None = None) -> list[str]:
    """``lightning-adapt fit`` with the recipe: ``steps`` steps ending the epoch (so validation runs once, at the
    end), no sanity pass, one checkpoint, the export / memory report / prediction writer off, and the probe."""
    clock: dict[str, Any] = {"out": str(out / "record.json")}
    clock.update({"profile_step": profile_step} if profile_step is not None else {})
    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": False}},
        {"class_path": "_clock_lightning.StepClock", "init_args": clock},
    ]
    return [
        *("lightning-adapt", "fit", "--config", recipe.path),
        f"--trainer.max_steps={steps}",
        f"--trainer.limit_train_batches={steps}",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={out}",
        f"--trainer.callbacks={json.dumps(callbacks)}",
        f"--data.init_args.batch_size={recipe.data['batch_size']}",
        "--merge=null",
        "--memory_report=null",
        "--predictions=null",
    ]


def trl_spec(recipe: Recipe, prepared: Prepared, steps: int, out: Path, profile_step: int | None = None) -> Path:
    spec = {
        "profile_step": profile_step,
        "model_dir": str(prepared.model_dir),
        "data_dir": str(prepared.data_dir),
        "reference": str(prepared.reference),
        "output_dir": str(out / "trl-output"),
        "out": str(out / "record.json"),
        "steps": steps,
        "batch_size": recipe.data["batch_size"],
        "max_length": recipe.data["max_length"],
        "lr": recipe.lr,
        "weight_decay": recipe.weight_decay,
        "warmup_steps": recipe.warmup_steps,
        "lora": recipe.lora,
        "seed": recipe.seed,
        "log_every_n_steps": recipe.log_every_n_steps,
        "qlora": recipe.mode == "qlora",
        "double_quant": recipe.double_quant,
    }
    path = out / "spec.json"
    path.write_text(json.dumps(spec, indent=1))
    return path


def job_environment(threads: int) -> dict[str, str]:
    """The same environment for both jobs: offline, ``threads`` torch threads, this checkout first on the path."""
    env = dict(os.environ)
    path = [str(ROOT), str(HERE), *filter(None, [env.get("PYTHONPATH")])]
    env.update(PYTHONPATH=os.pathsep.join(path), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.update(TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


@dataclass
class Job:
    """One measured job: its wall time, peak RSS and what its probe recorded."""

    name: str
    start_wall: float
    wall_s: float
    peak_bytes: int
    record: dict[str, Any] = field(default_factory=dict)

    def step_times(self, skip: int, key: str = "step_ends") -> list[float]:
        ends = self.record[key]
        return [b - a for a, b in itertools.pairwise(ends)][skip:]

    def step_s(self, skip: int) -> float:
        return statistics.median(self.step_times(skip))

    def step_cpu_s(self, skip: int) -> float:
        return statistics.median(self.step_times(skip, "step_cpu"))

    def in_step_s(self, skip: int) -> float:
        """Median time from a step's first hook (Lightning ``on_train_batch_start``, transformers ``on_step_begin``)
        to its end: forward, backward, optimizer; the rest of an interval is the loop between steps."""
        spans = [end - begin for begin, end in zip(self.record["step_begins"], self.record["step_ends"], strict=True)]
        return float(statistics.median(spans[skip + 1 :]))

    def memory(self, when: str, key: str) -> float:
        """MiB of ``key`` (``VmRSS`` / ``VmHWM``) the probe read at ``when`` (``start``: before step 1; ``end``)."""
        return float(self.record[f"memory_{when}"][key]) / 2**20

    @property
    def startup_s(self) -> float:
        """Process start to the end of the first optimizer step."""
        return float(self.record["step_walls"][0]) - self.start_wall

    @property
    def tail_s(self) -> float:
        """The end of the last optimizer step to the process's exit (validation, checkpoint, teardown)."""
        return self.start_wall + self.wall_s - float(self.record["step_walls"][-1])


def run_job(name: str, command: list[str], env: dict[str, str], out: Path) -> Job:
    """Run one job to its exit; its output goes to ``out/log.txt``. A failed job stops the benchmark."""
    executable = {"lightning-adapt": [sys.executable, "-m", "lightning_adapt.entry"]}.get(command[0], [command[0]])
    argv = [*executable, *command[1:]]
    with (out / "log.txt").open("w") as log:
        start_wall, start = time.time(), time.perf_counter()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not a running max over all children
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = (out / "log.txt").read_text()[-6000:]
        raise SystemExit(f"{name} job failed (exit {proc.returncode}): {' '.join(command)}\n{tail}")
    record = json.loads((out / "record.json").read_text())
    return Job(name, start_wall, wall, int(usage.ru_maxrss) * 1024, record)


def verify(job: Job, prepared: Prepared) -> None:
    """Fail loudly unless ``job`` trained on the recipe's batches and validated on its rows, token for token."""
    rec, problems = job.record, []
    if rec["train_digests"] != prepared.train_digests:
        bad = [i for i, (a, b) in enumerate(zip(rec["train_digests"], prepared.train_digests, strict=False)) if a != b]
        problems.append(
            f"training batches differ from the recipe's ({len(rec['train_digests'])} seen, "
            f"{len(prepared.train_digests)} expected; first differing: {bad[:1] or 'none (count)'})"
        )
    if rec["val_digests"] != prepared.val_digests or rec["val_tokens"] != prepared.val_tokens:
        problems.append(f"validation batches differ ({rec['val_tokens']} vs {prepared.val_tokens} response tokens)")
    if len(rec["step_ends"]) != len(prepared.train_digests):
        problems.append(f"{len(rec['step_ends'])} optimizer steps, {len(prepared.train_digests)} expected")
    if rec["val_loss"] is None:
        problems.append("no validation loss after training")
    if problems:
        raise SystemExit(f"{job.name} job: " + "; ".join(problems))


def run_rounds(recipe: Recipe, prepared: Prepared, args: argparse.Namespace, work: Path) -> list[dict[str, Job]]:
    env = job_environment(args.threads)
    rounds: list[dict[str, Job]] = []
    for i in range(args.rounds):
        order = ["ours", "trl"] if i % 2 == 0 else ["trl", "ours"]  # neither always first
        jobs = {}
        for name in order:
            out = work / f"round{i}-{name}"
            out.mkdir()
            spec = trl_spec(recipe, prepared, args.steps, out, args.profile_step)
            command = (
                ours_command(recipe, args.steps, out, args.profile_step)
                if name == "ours"
                else [sys.executable, str(HERE / "_trl_job.py"), str(spec)]
            )
            jobs[name] = job = run_job(name, command, env, out)
            verify(job, prepared)
            print(
                f"  round {i + 1}/{args.rounds} {name}: job {job.wall_s:.1f} s, step {job.step_s(args.skip):.3f} s, "
                f"peak {job.peak_bytes / 2**20:.0f} MiB, val_loss {job.record['val_loss']:.5f}",
                flush=True,
            )
        rounds.append(jobs)
    return rounds


# --------------------------------------------------------------------------- report


@dataclass(frozen=True)
class Metric:
    label: str
    value: Callable[[Job], float]
    unit: str
    goal: float | None = None


def metrics(skip: int) -> list[Metric]:
    return [
        Metric("whole job (process start to exit)", lambda j: j.wall_s, "s"),
        Metric(f"time per optimizer step (median of steps {skip + 2}..)", lambda j: j.step_s(skip), "s", GOALS["step"]),
        Metric("CPU time per optimizer step (same steps)", lambda j: j.step_cpu_s(skip), "s"),
        Metric("of which inside the step hooks (batch start to step end)", lambda j: j.in_step_s(skip), "s"),
        Metric("peak RSS (ru_maxrss of the job)", lambda j: j.peak_bytes / 2**20, "MiB", GOALS["peak"]),
        Metric("RSS before step 1 (imports, model, adapters, data)", lambda j: j.memory("start", "VmRSS"), "MiB"),
        Metric("peak RSS before step 1 (the load's peak)", lambda j: j.memory("start", "VmHWM"), "MiB"),
        Metric("RSS at the end: anonymous", lambda j: j.memory("end", "RssAnon"), "MiB"),
        Metric(
            "RSS at the end: file-backed (libraries, a memory-mapped checkpoint)",
            lambda j: j.memory("end", "RssFile"),
            "MiB",
        ),
        Metric("start to end of step 1 (imports, load, adapters, step 1)", lambda j: j.startup_s, "s"),
        Metric("end of last step to exit (validation, checkpoint, teardown)", lambda j: j.tail_s, "s"),
    ]


def versions(mode: str) -> str:
    names = ["trl", "peft", "transformers", "torch", "lightning", "accelerate", *(["bitsandbytes"] * (mode == "qlora"))]
    return ", ".join(f"{n} {importlib.metadata.version(n)}" for n in names)


def report(rounds: list[dict[str, Job]], recipe: Recipe, prepared: Prepared, args: argparse.Namespace) -> str:
    """The markdown block: the command, versions, machine note, the ratio table and the validation losses."""
    fmt = {"s": "{:.3f} s", "MiB": "{:.0f} MiB"}
    lines = [
        f"### {'QLoRA' if recipe.mode == 'qlora' else 'LoRA'}: `{recipe.path}` vs TRL `SFTTrainer` + PEFT",
        "",
        f"Command: `{' '.join(['python', 'benchmarks/bench_vs_trl.py', *args.argv])}`",
        "",
        f"- **machine**: 2 shared CPU cores (the lead engineer's runs may share them); {args.threads} torch thread(s) "
        f"per job; date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; load average before: "
        f"{args.load_before}",
        f"- **versions**: {versions(recipe.mode)}",
        f"- **work**: SmolLM2-135M-Instruct, fp32, {args.steps} optimizer steps of batch {recipe.data['batch_size']} "
        f"(the recipe's first {args.steps} `{recipe.data['batching']}` batches, {prepared.padding:.1%} padding), "
        f"lr {recipe.lr:g}, weight decay {recipe.weight_decay:g}, warmup {recipe.warmup_steps}, LoRA r "
        f"{recipe.lora['r']} alpha {recipe.lora['alpha']} dropout {recipe.lora['dropout']} on "
        f"{'/'.join(recipe.lora['target_modules'])}; validation: {len(prepared.val_digests)} batches, "
        f"{prepared.val_tokens} response tokens; batches checked identical on both sides (digests of all "
        f"{args.steps} training and {len(prepared.val_digests)} validation batches)",
        f"- **rounds**: {len(rounds)} (ours, TRL / TRL, ours / ...)",
        f"- **ours**: `{shlex.join(ours_command(recipe, args.steps, Path('OUT')))}` (in `python -m "
        "lightning_adapt.entry`, the probe `benchmarks/_clock_lightning.py` on the path)",
        "- **TRL**: `benchmarks/_trl_job.py`: `SFTTrainer(model=<dir>, peft_config=LoraConfig(same r, alpha, dropout, "
        "targets), train_sampling_strategy='sequential', completion_only_loss=True, max_grad_norm=0, "
        "gradient_checkpointing=False, bf16=False, save_steps=<steps>)` + the recipe's optimizer and schedule"
        + (
            ", `BitsAndBytesConfig(nf4, double quant, compute fp32)`, `bnb.optim.AdamW8bit`"
            if recipe.mode == "qlora"
            else ""
        ),
        "",
        "| measure | ours (median) | TRL (median) | ours / TRL (median) | range over rounds | goal | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in metrics(args.skip):
        ours = [m.value(r["ours"]) for r in rounds]
        trl = [m.value(r["trl"]) for r in rounds]
        ratios = sorted(a / b for a, b in zip(ours, trl, strict=True))
        median = statistics.median(ratios)
        goal, met = ("", "")
        if m.goal is not None:
            goal = f"≤ {m.goal}"
            met = "yes" if median <= m.goal else "no"
            if ratios[0] <= m.goal < ratios[-1]:
                met += " (range straddles the goal)"
        lines.append(
            f"| {m.label} | {fmt[m.unit].format(statistics.median(ours))} | {fmt[m.unit].format(statistics.median(trl))}"
            f" | **{median:.3f}** | {ratios[0]:.3f}..{ratios[-1]:.3f} | {goal} | {met} |"
        )
    diffs = [(r["ours"].record["val_loss"] - r["trl"].record["val_loss"]) / r["trl"].record["val_loss"] for r in rounds]
    worst = max(abs(d) for d in diffs)
    ours_losses = ", ".join(f"{r['ours'].record['val_loss']:.4f}" for r in rounds)
    trl_losses = ", ".join(f"{r['trl'].record['val_loss']:.4f}" for r in rounds)
    verdict = "yes" if worst <= VAL_LOSS_TOLERANCE else "no"
    lines.append(
        f"| validation loss (per response token) | {ours_losses} | {trl_losses} | relative difference "
        f"{', '.join(f'{d:+.2%}' for d in diffs)} | | within 1 % | {verdict} |"
    )
    return "\n".join(lines)


def write_results(path: Path, block: str, mode: str) -> None:
    """Replace this mode's block of ``path`` (between its markers), or append it under the section heading."""
    begin, end = f"<!-- bench_vs_trl {mode}:begin (generated; edit outside) -->", f"<!-- bench_vs_trl {mode}:end -->"
    text = path.read_text()
    generated = f"{begin}\n{block}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + generated + rest.split(end, 1)[1]
    elif SECTION in text:
        head, rest = text.split(SECTION, 1)
        text = f"{head}{SECTION}\n\n{generated}\n{rest}"
    else:
        text = f"{text.rstrip()}\n\n{SECTION}\n\n{generated}\n"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


# --------------------------------------------------------------------------- main


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per job")
    p.add_argument("--rounds", type=int, default=3, help="rounds of one job per side")
    p.add_argument("--skip", type=int, default=3, help="step intervals left out of the per-step median")
    p.add_argument("--threads", type=int, default=1, help="torch threads per job (OMP_NUM_THREADS)")
    p.add_argument("--batch-size", type=int, default=None, help="instead of the recipe's (4)")
    p.add_argument("--qlora", action="store_true", help="recipes/chat/qlora.yaml vs TRL with BitsAndBytesConfig NF4")
    p.add_argument("--results", type=Path, default=None, help="write the table into this markdown file")
    p.add_argument("--keep", type=Path, default=None, help="keep the jobs' logs, records and checkpoints here")
    p.add_argument("--prepare-only", action="store_true", help="prepare and check the data, run no job")
    p.add_argument(
        "--profile-step",
        type=int,
        default=None,
        help="profile this step (0-based) of each job with torch.profiler: one round, tables to stdout, no results",
    )
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.steps < args.skip + 2:
        p.error(f"--steps {args.steps} leaves no step after --skip {args.skip}")
    if args.profile_step is not None:
        if not 0 <= args.profile_step < args.steps:
            p.error(f"--profile-step {args.profile_step} is not one of the {args.steps} steps")
        args.rounds, args.results = 1, None
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)
    recipe = read_recipe("qlora" if args.qlora else "lora", args.batch_size)
    work = Path(tempfile.mkdtemp(prefix="bench-vs-trl-"))
    try:
        prepared = prepare(recipe, args.steps, work)
        print(
            f"{recipe.path}: {args.steps} training batches ({prepared.padding:.1%} padding), "
            f"{len(prepared.val_digests)} validation batches ({prepared.val_tokens} response tokens)",
            flush=True,
        )
        if args.prepare_only:
            return
        args.load_before = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        rounds = run_rounds(recipe, prepared, args, work)
        if args.profile_step is not None:
            for name in ("ours", "trl"):
                print(
                    f"\n=== {name}: step {args.profile_step}\n{(work / f'round0-{name}' / 'profile.txt').read_text()}"
                )
        block = report(rounds, recipe, prepared, args)
        print(block)
        if args.results:
            write_results(args.results, block, recipe.mode)
    finally:
        if args.keep:
            shutil.copytree(work, args.keep, dirs_exist_ok=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
