"""PNG pictures of a comparison and of adapter spectra (matplotlib, Agg backend, no display needed).

Each writer draws from the report's numbers and returns the series *read back from the figure's artists*
(bar heights, line data) before saving, so a test can check that what was drawn is what the report says.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.container import BarContainer
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from lightning_adapt.adapters.spectrum import LayerSpectrum
from lightning_adapt.atomic import atomic_file

__all__ = ["MEMORY_PARTS", "plot_losses", "plot_memory", "plot_metrics", "plot_spectra", "save_figure"]

#: Stacked parts of the memory bars: report field and label (``other`` = peak minus the three, at least 0).
MEMORY_PARTS = (
    ("weights_bytes", "weights"),
    ("gradient_bytes", "gradients"),
    ("optimizer_bytes", "optimizer state"),
    ("other_bytes", "other (activations, data, allocator)"),
)
_MB = 1e6
_DPI = 100


def save_figure(figure: Figure, path: str | Path) -> Path:
    """Write ``figure`` as PNG to ``path`` atomically (temp file beside it, ``fsync``, then rename)."""
    target = Path(path)
    try:
        with atomic_file(target) as handle:
            figure.savefig(handle, format="png", dpi=_DPI, bbox_inches="tight")
    finally:
        plt.close(figure)
    return target


def _heights(bars: BarContainer) -> list[float]:
    return [float(patch.get_height()) for patch in bars.patches]


def _ok(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [row for row in report["runs"] if row["ok"]]


def plot_memory(report: dict[str, Any], path: str | Path) -> dict[str, list[Any]]:
    """Stacked bars per recipe: weights, gradients, optimizer state, other (MB = 10⁶ bytes).

    Returns:
        ``{"recipes": [...], <part label>: [MB per recipe as drawn]}``.
    """
    rows = _ok(report)
    names = [row["name"] for row in rows]
    figure, axis = plt.subplots(figsize=(1.6 + 1.4 * len(rows), 3.6))
    bottom = [0.0] * len(rows)
    drawn: dict[str, list[Any]] = {"recipes": names}
    for key, label in MEMORY_PARTS:
        values = [(row.get(key) or 0) / _MB for row in rows]
        bars = axis.bar(names, values, bottom=bottom, label=label, width=0.6)
        drawn[label] = _heights(bars)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    kind = rows[0]["peak_kind"] if rows else "peak_rss"
    peak = "peak RSS above the interpreter baseline" if kind == "peak_rss" else "CUDA max allocated"
    axis.set_ylabel("MB")
    axis.set_title(f"Training memory per recipe (bar height: {peak})", fontsize=9)
    axis.legend(fontsize=8)
    save_figure(figure, path)
    return drawn


def _xy(line: Line2D) -> list[list[float]]:
    return [np.asarray(line.get_xdata(), dtype=float).tolist(), np.asarray(line.get_ydata(), dtype=float).tolist()]


def _loss_axis(axis: Axes, rows: list[dict[str, Any]], x_key: str, label: str) -> dict[str, list[list[float]]]:
    drawn = {}
    for row in rows:
        curve = row["loss_curve"]
        (line,) = axis.plot(curve[x_key], curve["loss"], label=row["name"], linewidth=1.2)
        drawn[row["name"]] = _xy(line)
    axis.set_xlabel(label)
    axis.set_ylabel("training loss")
    axis.legend(fontsize=8)
    return drawn


def plot_losses(report: dict[str, Any], path: str | Path) -> dict[str, dict[str, list[list[float]]]]:
    """Training-loss curves overlaid, against the step (left) and the wall-clock time since training began (right).

    Returns:
        ``{"step": {recipe: [x, y]}, "time": {recipe: [x, y]}}`` as drawn.
    """
    rows = _ok(report)
    figure, (by_step, by_time) = plt.subplots(1, 2, figsize=(9, 3.4))
    drawn = {"step": _loss_axis(by_step, rows, "step", "step"), "time": _loss_axis(by_time, rows, "time", "seconds")}
    figure.suptitle("Training loss per step and per second of training", fontsize=10)
    save_figure(figure, path)
    return drawn


def plot_metrics(report: dict[str, Any], path: str | Path, metrics: list[str]) -> dict[str, dict[str, list[float]]]:
    """Per metric one panel: the validation metric before and after training, per recipe.

    Returns:
        ``{metric: {recipe: [before, after]}}`` as drawn (NaN where a value is missing).
    """
    rows = _ok(report)
    figure, axes = plt.subplots(1, max(len(metrics), 1), figsize=(0.8 + 3.4 * max(len(metrics), 1), 3.2), squeeze=False)
    drawn: dict[str, dict[str, list[float]]] = {}
    positions = list(range(len(rows)))
    for axis, metric in zip(axes[0], metrics, strict=False):
        before = [row["metrics_before"].get(metric, float("nan")) for row in rows]
        after = [row["metrics_after"].get(metric, float("nan")) for row in rows]
        first = axis.bar([p - 0.2 for p in positions], before, width=0.4, label="before")
        second = axis.bar([p + 0.2 for p in positions], after, width=0.4, label="after")
        pairs = zip(_heights(first), _heights(second), strict=True)
        drawn[metric] = {row["name"]: [b, a] for row, (b, a) in zip(rows, pairs, strict=True)}
        axis.set_xticks(positions, [row["name"] for row in rows])
        axis.set_title(metric, fontsize=9)
        axis.legend(fontsize=8)
    figure.suptitle("Validation before and after training", fontsize=10)
    save_figure(figure, path)
    return drawn


def plot_spectra(spectra: list[LayerSpectrum], path: str | Path) -> dict[str, list[list[float]]]:
    """One panel per layer type: each layer's singular values (log scale) against their index.

    Returns:
        ``{layer_type: [singular values of each layer, in plotting order]}`` as drawn (zeros drawn at 1e-30).
    """
    by_type: dict[str, list[LayerSpectrum]] = {}
    for spectrum in spectra:
        by_type.setdefault(spectrum.layer_type, []).append(spectrum)
    columns = min(len(by_type), 2)
    rows = -(-len(by_type) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 2.9 * rows), squeeze=False)
    for axis in axes.flat[len(by_type) :]:
        axis.set_visible(False)
    drawn: dict[str, list[list[float]]] = {}
    for axis, (kind, group) in zip(axes.flat, by_type.items(), strict=False):
        drawn[kind] = []
        for spectrum in group:
            values = [max(v, 1e-30) for v in spectrum.singular_values]
            (line,) = axis.plot(range(1, len(values) + 1), values, marker=".", alpha=0.6)
            drawn[kind].append(_xy(line)[1])
        axis.set_yscale("log")
        axis.set_title(f"{kind} (r={group[0].r}, {len(group)} layers)", fontsize=9)
        axis.set_xlabel("singular value index", fontsize=8)
        axis.set_ylabel("σ of scale·B A", fontsize=8)
    figure.suptitle("LoRA update spectra (one line per layer)", fontsize=10)
    figure.tight_layout()
    save_figure(figure, path)
    return drawn
