"""Figures of the activation analysis: MSO against η per layer, probe accuracy and mean difference by layer."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.ticker import MaxNLocator

from safeproj.plots import new_figure, save_png


def plot_mso(mso_rows: Sequence[Mapping], path: str | os.PathLike) -> Path:
    """MSO vs η, one panel per layer: first and last step, uncentered and centered, with baselines."""
    layers = sorted({r["layer"] for r in mso_rows})
    steps = sorted({r["step"] for r in mso_rows})
    shown = [steps[0]] if len(steps) == 1 else [steps[0], steps[-1]]
    cols = min(4, len(layers))
    nrows = math.ceil(len(layers) / cols)
    fig = new_figure(width=3.6 * cols + 0.6, height=3.0 * nrows + 0.6)
    for i, layer in enumerate(layers):
        ax = fig.add_subplot(nrows, cols, i + 1)
        for j, step in enumerate(shown):
            for centered, style in ((False, "-"), (True, "--")):
                sel = [r for r in mso_rows if (r["layer"], r["step"], r["centered"]) == (layer, step, centered)]
                sel.sort(key=lambda r: r["eta"])
                if not sel:
                    continue
                eta = [r["eta"] for r in sel]
                label = f"step {step}{' centered' if centered else ''}"
                ax.plot(eta, [r["mso"] for r in sel], style, marker="o", markersize=3, color=f"C{j}", label=label)
                ax.plot(eta, [r["baseline"] for r in sel], style, color=f"C{j}", alpha=0.3, linewidth=1)
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("η (energy share)")
        ax.set_ylabel("MSO harmful vs benign")
        ax.set_ylim(0, 1.05)
        ax.grid(True, alpha=0.3)
        if i == 0:
            ax.legend(fontsize="x-small")
    fig.suptitle("Activation MSO (faint: random baseline)")
    return save_png(fig, path)


def plot_layers(layer_rows: Sequence[Mapping], path: str | os.PathLike) -> Path:
    """Probe accuracy and difference-of-means norm vs layer, first vs last recorded step."""
    steps = sorted({r["step"] for r in layer_rows})
    shown = [steps[0]] if len(steps) == 1 else [steps[0], steps[-1]]
    fig = new_figure(width=9.0, height=3.6)
    panels = (("probe_accuracy", "probe held-out accuracy"), ("diff_norm", "‖mean(harmful) − mean(benign)‖"))
    for k, (metric, label) in enumerate(panels):
        ax = fig.add_subplot(1, 2, k + 1)
        for j, step in enumerate(shown):
            sel = sorted((r for r in layer_rows if r["step"] == step), key=lambda r: r["layer"])
            xs, ys = [r["layer"] for r in sel], [r[metric] for r in sel]
            ax.plot(xs, ys, marker="o", color=f"C{j}", label=f"step {step}")
        if metric == "probe_accuracy":
            ax.axhline(0.5, color="gray", linestyle="--", linewidth=1, label="chance")
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    return save_png(fig, path)
