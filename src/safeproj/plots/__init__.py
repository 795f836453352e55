"""Small matplotlib helpers shared by the analyses: line plots with a baseline and heatmaps.

Figures are built on the Agg canvas directly (no pyplot state, safe in worker threads and on
headless machines) and written atomically as PNG: a temp file in the target folder, then a rename.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from safeproj.io import atomic_file

Series = tuple[Sequence[float], Sequence[float]]


def new_figure(width: float = 6.4, height: float = 4.4) -> Figure:
    """A figure bound to the Agg canvas, independent of any pyplot backend setting."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Write `fig` to `path` as PNG atomically and return the path."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"plot path must end in .png, got {str(path)!r}")
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path


def line_plot(
    series: Mapping[str, Series],
    path: str | os.PathLike,
    *,
    baseline: Series | None = None,
    baseline_label: str = "random baseline",
    emphasize: str | None = None,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    ylim: tuple[float, float] | None = None,
) -> Path:
    """One line per named (x, y) series, an optional dashed baseline, saved as PNG.

    `emphasize` names a series drawn thicker and black (e.g. a model-wide mean among per-group lines).
    """
    if not series:
        raise ValueError("line_plot needs at least one series")
    for name, (x, y) in series.items():
        if len(x) != len(y):
            raise ValueError(f"series {name!r} has {len(x)} x values but {len(y)} y values")
    if emphasize is not None and emphasize not in series:
        raise ValueError(f"emphasize={emphasize!r} is not a series; have {sorted(series)}")
    fig = new_figure()
    ax = fig.add_subplot()
    for name, (x, y) in series.items():
        style = {"color": "black", "linewidth": 2.5, "zorder": 3} if name == emphasize else {"linewidth": 1.4}
        ax.plot(list(x), list(y), marker="o", markersize=3, label=name, **style)
    if baseline is not None:
        bx, by = baseline
        ax.plot(list(bx), list(by), linestyle="--", color="gray", linewidth=1.6, label=baseline_label)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", ncols=2 if len(series) > 6 else 1)
    return save_png(fig, path)


def heatmap(
    values: Sequence[Sequence[float]],
    path: str | os.PathLike,
    *,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    colorbar_label: str = "",
    center: float | None = None,
    annotate: bool | None = None,
) -> Path:
    """A rows × columns heatmap saved as PNG; NaN cells stay blank.

    With `center` the colour scale diverges from that value (e.g. 1 for a ratio to a baseline).
    `annotate` writes each value in its cell; by default only for small grids.
    """
    rows = [list(map(float, row)) for row in values]
    if not rows or not rows[0]:
        raise ValueError("heatmap needs at least one row and one column")
    if any(len(row) != len(rows[0]) for row in rows):
        raise ValueError("heatmap rows must all have the same length")
    if len(rows) != len(row_labels) or len(rows[0]) != len(col_labels):
        raise ValueError(
            f"heatmap is {len(rows)}×{len(rows[0])} but got {len(row_labels)} row labels "
            f"and {len(col_labels)} column labels"
        )
    finite = [v for row in rows for v in row if math.isfinite(v)]
    kwargs: dict = {"cmap": "viridis"}
    if center is not None and finite:
        # White at `center`, each side stretched to its own extreme (ratios are far from symmetric).
        pad = 1e-6 * max(1.0, abs(center))
        low, high = min(min(finite), center - pad), max(max(finite), center + pad)
        kwargs = {"cmap": "RdBu_r", "norm": TwoSlopeNorm(vcenter=center, vmin=low, vmax=high)}
    fig = new_figure(width=max(4.8, 0.55 * len(col_labels) + 2.5), height=max(3.2, 0.28 * len(rows) + 1.8))
    ax = fig.add_subplot()
    image = ax.imshow(rows, aspect="auto", interpolation="nearest", **kwargs)
    ax.set_xticks(range(len(col_labels)), [str(c) for c in col_labels])
    ax.set_yticks(range(len(row_labels)), [str(r) for r in row_labels])
    if annotate is None:
        annotate = len(rows) * len(rows[0]) <= 120
    if annotate:
        for i, row in enumerate(rows):
            for j, v in enumerate(row):
                if math.isfinite(v):
                    ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=6)
    fig.colorbar(image, ax=ax, label=colorbar_label)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return save_png(fig, path)
