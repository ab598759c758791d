"""The runs of ``lightning-adapt compare``: the plan (checked before anything runs) and one ``fit`` per recipe.

Each recipe runs as ``python -m lightning_adapt.cli fit --config RECIPE <overrides>`` in a fresh process (its
peak memory is its own), one after the other, with the same seed, data and step budget (the overrides apply to
every run). A :class:`~lightning_adapt.compare.record.CompareRecorder` added to each run writes ``record.json``;
a run that fails (out of memory included) keeps its row with the error and the others still run.

With a step budget (``--trainer.max_steps N``, given or in the first recipe) every run trains exactly ``N``
steps and validates after the last one (``max_epochs=-1``, ``val_check_interval=N``,
``check_val_every_n_epoch=null``), unless those options are given too: the "after" metric is then always
measured at the same step.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lightning_adapt.compare.files import RECORD_ENV
from lightning_adapt.errors import ConfigError

__all__ = ["Plan", "Run", "load_recipes", "make_plan", "override_value", "run_all", "run_command"]

#: Recipe keys that must agree for recipes to train the same task on the same data.
TASK_KEYS = ("model.class_path", "model.init_args.model_name_or_path", "data.class_path", "data.init_args")
_LOG_TAIL = 60


@dataclass
class Run:
    """One recipe's run: where it writes, how it ended."""

    recipe: Path
    name: str
    out: Path
    returncode: int | None = None
    seconds: float = 0.0
    error: str | None = None

    @property
    def record_path(self) -> Path:
        return self.out / "record.json"

    @property
    def log_path(self) -> Path:
        return self.out / "run.log"


@dataclass
class Plan:
    """What ``compare`` will run: the runs, the overrides every run gets, where the report goes."""

    runs: list[Run]
    overrides: list[str]
    output: Path
    recipes: dict[Path, dict[str, Any]] = field(default_factory=dict)


def _get(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def load_recipes(paths: list[str]) -> dict[Path, dict[str, Any]]:
    """The parsed recipes; raises :class:`ConfigError` for a missing or unreadable file, or recipes of different
    tasks (another model class, model name, data module or data settings than the first recipe)."""
    if not paths:
        raise ConfigError("RECIPE: none given. Fix: lightning-adapt compare recipes/sentiment/{full,lora,qlora}.yaml")
    recipes: dict[Path, dict[str, Any]] = {}
    for raw in paths:
        path = Path(raw)
        if not path.is_file():
            raise ConfigError(f"RECIPE={raw!r}: no such recipe file. Fix: pass existing recipe YAML files.")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            problem = str(err).replace("\n", " ")
            raise ConfigError(f"RECIPE={raw!r}: not valid YAML ({problem}). Fix: pass a recipe file.") from None
        if not isinstance(loaded, dict) or "model" not in loaded:
            raise ConfigError(f"RECIPE={raw!r}: no model: key, not a recipe. Fix: pass lightning-adapt fit configs.")
        recipes[path] = loaded
    (first, reference), *rest = recipes.items()
    for path, config in rest:
        for key in TASK_KEYS:
            if _get(config, key) != _get(reference, key):
                raise ConfigError(
                    f"RECIPE={str(path)!r}: {key}={_get(config, key)!r} differs from {str(first)!r}'s "
                    f"{_get(reference, key)!r}; compare runs recipes of one task on the same model and data. "
                    "Fix: pass recipes that differ only in their fine-tuning method."
                )
    return recipes


def _names(paths: list[Path]) -> list[str]:
    """Each recipe's file stem; with the parent folder where stems repeat (``sentiment-lora``)."""
    stems = [path.stem for path in paths]
    names = [f"{p.parent.name}-{p.stem}" if stems.count(p.stem) > 1 else p.stem for p in paths]
    return [f"{name}-{i}" if names.count(name) > 1 else name for i, name in enumerate(names, 1)]


def override_value(overrides: list[str], key: str) -> str | None:
    """The value ``overrides`` give ``key`` (``--key V`` or ``--key=V``; the last one wins)."""
    value = None
    for i, arg in enumerate(overrides):
        if arg == f"--{key}" and i + 1 < len(overrides):
            value = overrides[i + 1]
        elif arg.startswith(f"--{key}="):
            value = arg.split("=", 1)[1]
    return value


def _budget(overrides: list[str], first: dict[str, Any]) -> list[str]:
    """The options that make every run train exactly ``max_steps`` and validate after the last one."""
    raw = override_value(overrides, "trainer.max_steps") or _get(first, "trainer.max_steps")
    try:
        steps = int(raw) if raw is not None else -1
    except ValueError:
        raise ConfigError(f"--trainer.max_steps={raw!r} is not an integer. Fix: e.g. --trainer.max_steps 60.") from None
    defaults = {"trainer.enable_progress_bar": "false"}  # the parent shows progress across the runs
    if steps > 0:
        defaults |= {"trainer.max_epochs": "-1", "trainer.val_check_interval": str(steps)}
        defaults |= {"trainer.check_val_every_n_epoch": "null"}
    return [f"--{key}={value}" for key, value in defaults.items() if override_value(overrides, key) is None]


def make_plan(paths: list[str], overrides: list[str], output: str, overwrite: bool) -> Plan:
    """Check everything the user can get wrong and return the runs; raises :class:`ConfigError`."""
    recipes = load_recipes(paths)
    root = Path(output)
    runs = [Run(path, name, root / name) for path, name in zip(recipes, _names(list(recipes)), strict=True)]
    used = [run.out for run in runs if run.out.is_dir() and any(run.out.iterdir())]
    if used and not overwrite:
        raise ConfigError(
            f"--output={output!r}: holds runs of an earlier compare ({', '.join(str(p) for p in used)}). "
            "Fix: pass another --output, or --overwrite to replace them."
        )
    extra = _budget(overrides, next(iter(recipes.values())))
    return Plan(runs, [*extra, *overrides], root, recipes)


def command(run: Run, overrides: list[str], has_memory_report: bool) -> list[str]:
    """The child's command line: ``fit`` of the recipe, logging under the run's folder, with the recorder."""
    memory = [] if has_memory_report else ["--memory_report=lightning_adapt.MemoryReportCallback"]
    return [
        sys.executable, "-m", "lightning_adapt.cli", "fit", "--config", str(run.recipe),
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.init_args.save_dir={run.out}", "--trainer.logger.init_args.name=",
        "--trainer.logger.init_args.version=run",
        "--trainer.callbacks+=lightning_adapt.compare.record.CompareRecorder",
        *memory, *overrides,
    ]  # fmt: skip


def run_command(plan: Plan, run: Run) -> list[str]:
    """:func:`command` for ``run`` of ``plan`` (a recipe without ``memory_report:`` gets one added)."""
    return command(run, plan.overrides, bool(plan.recipes.get(run.recipe, {}).get("memory_report")))


def failure(log: Path, returncode: int) -> str:
    """One line saying why a run failed: out of memory, the CLI's one-line error, or the last error line."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    text = "\n".join(lines[-_LOG_TAIL:]).lower()
    if "out of memory" in text or "outofmemoryerror" in text or returncode in (-9, 137):
        return f"out of memory (exit {returncode})"
    errors = [line for line in lines if "error" in line.lower()]
    return f"exit {returncode}: {(errors or lines or ['no output'])[-1][:300]}"


def _recorded(path: Path) -> bool:
    """Whether the recorder wrote its end-of-fit record (not only the steps before an exception)."""
    try:
        return "exception" not in json.loads(path.read_text())
    except (OSError, ValueError):
        return False


def _progress(run: Run, index: int, total: int, started: float) -> str:
    try:
        step, steps = Path(f"{run.record_path}.progress").read_text().split()
        where = f"step {step}/{steps}"
    except (OSError, ValueError):
        where = "starting"
    return f"[{index}/{total}] {run.name}: {where}, {time.perf_counter() - started:.0f}s"


def _wait(process: subprocess.Popen[bytes], run: Run, index: int, total: int, echo: bool) -> int:
    """Wait for the child; on a terminal, redraw one progress line every second."""
    started, live = time.perf_counter(), echo and sys.stderr.isatty()
    while True:
        try:
            return process.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            if live:
                print(f"\r{_progress(run, index, total, started)}\033[K", end="", file=sys.stderr, flush=True)


def run_all(plan: Plan, echo: bool = True) -> None:
    """Run each recipe in its own process, one after the other; progress on stderr, output in ``run.log``."""
    started = time.perf_counter()
    total = len(plan.runs)
    for index, run in enumerate(plan.runs, 1):
        shutil.rmtree(run.out, ignore_errors=True)
        run.out.mkdir(parents=True)
        if echo:
            print(f"[{index}/{total}] {run.name}: fit --config {run.recipe} "
                  f"({time.perf_counter() - started:.0f}s so far)", file=sys.stderr)  # fmt: skip
        env = {**os.environ, RECORD_ENV: str(run.record_path)}
        t0 = time.perf_counter()
        with run.log_path.open("wb") as handle:
            process = subprocess.Popen(run_command(plan, run), stdout=handle, stderr=subprocess.STDOUT, env=env)
            run.returncode = _wait(process, run, index, total, echo)
        run.seconds = time.perf_counter() - t0
        if run.returncode != 0:
            run.error = failure(run.log_path, run.returncode)
        elif not _recorded(run.record_path):
            run.error = "finished without a record (the recorder did not reach the end of fit)"
        if echo:
            status = "ok" if run.error is None else f"FAILED: {run.error}"
            end = "\r\033[K" if sys.stderr.isatty() else ""
            print(f"{end}[{index}/{total}] {run.name}: {status} in {run.seconds:.0f}s (log: {run.log_path})",
                  file=sys.stderr)  # fmt: skip
