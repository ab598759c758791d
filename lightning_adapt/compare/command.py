"""``lightning-adapt compare RECIPE... [--output DIR] [--project MODEL] [overrides]``: full vs LoRA vs QLoRA, measured.

Example::

    lightning-adapt compare recipes/sentiment/{full,lora,qlora}.yaml --trainer.max_steps 60 --project llama-2-7b

Runs each recipe's ``fit`` in a fresh process, one after the other, with the same seed, data and step budget
(every ``--trainer.*`` / ``--model.*`` / ``--data.*`` / recipe-key option is passed to every run), then writes
into ``--output``: ``report.md`` (also printed), ``report.json``, ``memory.png``, ``losses.png``,
``metrics.png``, ``rank-<recipe>.png`` for adapter runs, ``pictures.json`` (the series each picture drew) and
one folder per run (``run.log``, ``record.json``, its logs, checkpoint and export). A bad argument (a missing
recipe, recipes of different tasks, an unknown ``--project`` model, an option that a recipe's ``fit`` would
refuse) is one line on stderr and exit 2 before anything runs; a failed run keeps its row, the others still run, and the exit status is then 1.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from lightning_adapt.adapters.spectrum import LayerSpectrum
from lightning_adapt.atomic import write_text_atomic
from lightning_adapt.compare.files import require_plots, write_json
from lightning_adapt.compare.inspect import adapter_rank
from lightning_adapt.compare.project import load_projection_shape, project_row
from lightning_adapt.compare.report import build_report, markdown, primary_metric
from lightning_adapt.compare.runner import Plan, make_plan, run_all, run_command
from lightning_adapt.errors import ConfigError
from lightning_adapt.memory.estimator import ModelShape

__all__ = ["Options", "main", "parse_args"]

_DTYPES = ("bf16", "fp16", "fp32")
_HELP = """usage: lightning-adapt compare RECIPE... [--output DIR] [--overwrite] [--project MODEL]
                               [--project_dtype {bf16,fp16,fp32}] [fit options for every run]

  RECIPE            recipe YAML files of one task (the first is the reference of the ratios)
  --output DIR      folder of the report, the pictures and one folder per run (default: outputs/compare)
  --overwrite       replace the run folders of an earlier compare in --output
  --project MODEL   also estimate each recipe's settings on MODEL: an estimator preset (llama-2-7b, ...) or
                    a Hugging Face config.json (or its folder)
  --project_dtype   dtype of the projection's weights and adapters (default: the measured run's own)
  other options     passed to every fit, e.g. --trainer.max_steps 60 --data.init_args.batch_size 8
"""


@dataclass
class Options:
    """The command line, split: compare's own options, the recipes, the overrides for every run."""

    recipes: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)
    output: str = "outputs/compare"
    overwrite: bool = False
    project: str | None = None
    project_dtype: str | None = None


_VALUED = {"--output": "output", "--project": "project", "--project_dtype": "project_dtype"}


def _value(argv: list[str], i: int) -> tuple[str, int]:
    """The value of the option at ``argv[i]`` (``--key=V`` or ``--key V``) and the index after it."""
    if "=" in argv[i]:
        return argv[i].split("=", 1)[1], i + 1
    if i + 1 >= len(argv):
        raise ConfigError(f"{argv[i]}: needs a value. Fix: {argv[i]} VALUE.")
    return argv[i + 1], i + 2


def parse_args(argv: list[str]) -> Options:
    """Split ``argv``; an option ``--key`` of a run takes the next argument as its value unless written ``--key=V``."""
    options, i = Options(), 0
    while i < len(argv):
        arg, key = argv[i], argv[i].split("=", 1)[0]
        if key in _VALUED:
            value, i = _value(argv, i)
            setattr(options, _VALUED[key], value)
        elif arg == "--overwrite":
            options.overwrite, i = True, i + 1
        elif arg.startswith("-"):
            value, i = _value(argv, i)
            options.overrides += [key, value]
        else:
            options.recipes.append(arg)
            i += 1
    if options.project_dtype is not None and options.project_dtype not in _DTYPES:
        raise ConfigError(
            f"--project_dtype={options.project_dtype!r} is not one of {', '.join(_DTYPES)}. "
            "Fix: e.g. --project_dtype bf16 for a GPU projection, or leave it out to keep the run's dtypes."
        )
    return options


def _pictures(report: dict[str, Any], output: Path) -> tuple[dict[str, str], dict[str, Any]]:
    """Write the PNGs; ``({label: file name}, {picture: series drawn})``."""
    from lightning_adapt.compare.plots import plot_losses, plot_memory, plot_metrics, plot_spectra

    rows = [row for row in report["runs"] if row["ok"]]
    if not rows:
        return {}, {}
    metric = primary_metric(rows)
    metrics = [metric] if metric else []
    metrics += [key for key in rows[0]["metrics_after"] if "loss" in key and key not in metrics][:1]
    files = {"memory": "memory.png", "training loss": "losses.png", "validation metrics": "metrics.png"}
    drawn: dict[str, Any] = {
        "memory.png": plot_memory(report, output / "memory.png"),
        "losses.png": plot_losses(report, output / "losses.png"),
        "metrics.png": plot_metrics(report, output / "metrics.png", metrics),
    }
    for row in rows:
        layers = (row.get("rank") or {}).get("layers")
        if layers:
            spectra = [LayerSpectrum(la["name"], la["r"], tuple(la["singular_values"])) for la in layers]
            name = f"rank-{row['name']}.png"
            drawn[name] = plot_spectra(spectra, output / name)
            files[f"update spectra of {row['name']}"] = name
    return files, drawn


def _prepare(options: Options) -> tuple[Plan, ModelShape | None]:
    """The plan and projection shape, every recipe parsed with the overrides first: a misspelled or mistyped
    option is one line before anything runs, not a failed row per recipe."""
    from lightning_adapt.cli import check_fit_arguments

    require_plots()
    shape = load_projection_shape(options.project) if options.project else None
    plan = make_plan(options.recipes, options.overrides, options.output, options.overwrite)
    for run in plan.runs:
        child = run_command(plan, run)  # [python, -m, lightning_adapt.cli, fit, *fit's arguments]
        check_fit_arguments(child[child.index("fit") + 1 :], f"RECIPE={str(run.recipe)!r} with the options given")
    return plan, shape


def _fail(err: ConfigError) -> NoReturn:
    if os.environ.get("LIGHTNING_ADAPT_DEBUG"):
        raise err
    print(f"lightning-adapt: error: {err}", file=sys.stderr)
    raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``lightning-adapt compare``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(arg in ("-h", "--help") for arg in args):
        print(_HELP, end="")
        return
    try:
        options = parse_args(args)
        plan, shape = _prepare(options)
    except ConfigError as err:
        _fail(err)
    run_all(plan)
    command = shlex.join(["lightning-adapt", "compare", *args])
    report = build_report(plan, command, shape.name if shape is not None else None, options.project_dtype)
    for row in report["runs"]:
        if row["ok"]:
            row["rank"] = adapter_rank(row)
        if shape is not None:
            row["projection"] = project_row(row, shape, options.project_dtype)
    pictures, drawn = _pictures(report, plan.output)
    report["pictures"] = pictures
    write_json(plan.output / "report.json", report)
    write_json(plan.output / "pictures.json", drawn)
    text = markdown(report, pictures)
    write_text_atomic(plan.output / "report.md", text)
    print(text, end="")
    print(f"report: {plan.output / 'report.md'} and report.json; pictures: {', '.join(pictures.values())}")
    if any(not row["ok"] for row in report["runs"]):
        raise SystemExit(1)
