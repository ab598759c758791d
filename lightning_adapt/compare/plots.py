"""PNG pictures (matplotlib, Agg backend, no display needed); each writer returns the plotted series."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from lightning_adapt.adapters.spectrum import LayerSpectrum

__all__ = ["plot_spectra", "save_figure"]


def save_figure(figure: Figure, path: str | Path) -> Path:
    """Write ``figure`` as PNG to ``path`` atomically (temporary file in the same folder, then ``os.replace``)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=target.parent)
    os.close(fd)
    try:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        os.replace(tmp, target)
    finally:
        plt.close(figure)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def plot_spectra(spectra: list[LayerSpectrum], path: str | Path) -> dict[str, list[list[float]]]:
    """One panel per layer type: each layer's singular values (log scale) against their index.

    Returns:
        The plotted series, ``{layer_type: [singular values of each layer, in plotting order]}``.
    """
    by_type: dict[str, list[LayerSpectrum]] = {}
    for spectrum in spectra:
        by_type.setdefault(spectrum.layer_type, []).append(spectrum)
    figure, axes = plt.subplots(1, len(by_type), figsize=(4 * len(by_type), 3.2), squeeze=False)
    plotted: dict[str, list[list[float]]] = {}
    for axis, (kind, group) in zip(axes[0], by_type.items(), strict=True):
        plotted[kind] = []
        for spectrum in group:
            values = [max(v, 1e-30) for v in spectrum.singular_values]
            axis.plot(range(1, len(values) + 1), values, marker=".", alpha=0.6)
            plotted[kind].append(list(spectrum.singular_values))
        axis.set_yscale("log")
        axis.set_title(f"{kind} (r={group[0].r}, {len(group)} layers)", fontsize=9)
        axis.set_xlabel("singular value index")
        axis.set_ylabel("σ of scale·B A")
    figure.suptitle("LoRA update spectra")
    save_figure(figure, path)
    return plotted
