"""``lightning-adapt compare RECIPE... [--output DIR] [--project MODEL] [overrides]``: one ``fit`` per recipe.

Each recipe runs as ``python -m lightning_adapt.cli fit --config RECIPE <overrides>`` in a fresh process (its
peak memory is its own), one after the other, with the same seed, data and step budget (the overrides apply to
every run). A :class:`~lightning_adapt.compare.record.CompareRecorder` added to each run writes ``record.json``;
a run that fails (out of memory included) keeps its row with the error and the others still run. Everything
the user can get wrong (missing recipe, recipes for different tasks, unknown projection model) is checked
before anything runs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lightning_adapt.compare.record import RECORD_ENV
from lightning_adapt.errors import ConfigError

__all__ = ["Run", "load_recipes", "main_args", "run_all"]

#: Recipe keys that must agree for recipes to train the same task on the same data.
_TASK_KEYS = ("model.class_path", "model.init_args.model_name_or_path", "data.class_path", "data.init_args")


@dataclass
class Run:
    """One recipe's run: where it wrote, how it ended."""

    recipe: Path
    name: str
    out: Path
    returncode: int | None = None
    seconds: float = 0.0
    error: str | None = None


def _get(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def load_recipes(paths: list[str]) -> dict[Path, dict[str, Any]]:
    """The parsed recipes; raises :class:`ConfigError` for a missing file or recipes of different tasks."""
    if not paths:
        raise ConfigError("RECIPE: none given. Fix: lightning-adapt compare recipes/sentiment/{full,lora,qlora}.yaml")
    recipes: dict[Path, dict[str, Any]] = {}
    for raw in paths:
        path = Path(raw)
        if not path.is_file():
            raise ConfigError(f"RECIPE={raw!r}: no such recipe file. Fix: pass existing recipe YAML files.")
        loaded = yaml.safe_load(path.read_text())
        recipes[path] = loaded if isinstance(loaded, dict) else {}
    first, *rest = recipes.items()
    for path, config in rest:
        for key in _TASK_KEYS:
            if _get(config, key) != _get(first[1], key):
                raise ConfigError(
                    f"RECIPE={str(path)!r}: {key}={_get(config, key)!r} differs from {str(first[0])!r}'s "
                    f"{_get(first[1], key)!r}; compare runs recipes of one task on the same model and data. "
                    "Fix: pass recipes that differ only in their fine-tuning method."
                )
    return recipes


def _command(run: Run, overrides: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "lightning_adapt.cli", "fit", "--config", str(run.recipe),
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.init_args.save_dir={run.out}", "--trainer.logger.init_args.name=",
        "--trainer.logger.init_args.version=run",
        "--trainer.callbacks+=lightning_adapt.compare.record.CompareRecorder",
        *overrides,
    ]  # fmt: skip


def _error(log: Path, returncode: int) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    text = "\n".join(lines[-60:]).lower()
    if "out of memory" in text or "outofmemoryerror" in text or returncode in (-9, 137):
        return f"out of memory (exit {returncode})"
    errors = [line for line in lines if "error" in line.lower()]
    return f"exit {returncode}: {(errors or lines or ['no output'])[-1][:200]}"


def run_all(runs: list[Run], overrides: list[str], echo: bool = True) -> None:
    """Run each recipe in its own process, one after the other; progress on stderr, output in ``run.log``."""
    started = time.perf_counter()
    for index, run in enumerate(runs, 1):
        run.out.mkdir(parents=True, exist_ok=True)
        if echo:
            elapsed = time.perf_counter() - started
            print(
                f"[{index}/{len(runs)}] {run.name}: fit --config {run.recipe} ({elapsed:.0f}s so far)", file=sys.stderr
            )
        env = {**os.environ, RECORD_ENV: str(run.out / "record.json")}
        log = run.out / "run.log"
        t0 = time.perf_counter()
        with log.open("w") as handle:
            done = subprocess.run(
                _command(run, overrides), stdout=handle, stderr=subprocess.STDOUT, env=env, check=False
            )
        run.seconds, run.returncode = time.perf_counter() - t0, done.returncode
        if done.returncode != 0 or not (run.out / "record.json").is_file():
            run.error = _error(log, done.returncode) if done.returncode else "finished without a record"
        if echo:
            status = "ok" if run.error is None else f"FAILED: {run.error}"
            print(f"[{index}/{len(runs)}] {run.name}: {status} in {run.seconds:.0f}s (log: {log})", file=sys.stderr)


def main_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """``(known options, overrides passed to every fit)``."""
    parser = argparse.ArgumentParser(prog="lightning-adapt compare", description=__doc__.split("\n")[0])
    parser.add_argument("recipes", nargs="*", help="Recipe YAML files of one task (the first is the reference).")
    parser.add_argument("--output", default="outputs/compare", help="Folder for runs, report.md/json and PNGs.")
    parser.add_argument("--project", help="Also project each recipe to this model (estimator preset or config.json).")
    known, overrides = parser.parse_known_args(argv)
    recipes = [arg for arg in overrides if not arg.startswith("-") and arg.endswith((".yaml", ".yml"))]
    if recipes and overrides and overrides[0] == recipes[0]:  # recipes after an option land in the rest
        known.recipes += recipes
        overrides = [arg for arg in overrides if arg not in recipes]
    return known, overrides
