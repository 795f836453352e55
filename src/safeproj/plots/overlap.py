"""Figures of subspace overlap: MSO against η, the layer × η ratio to the random baseline, energy kept by P_k.

Each takes rows already aggregated (`safeproj.core.overlap.aggregate`, pooled energy rows) as plain dicts.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safeproj.plots import heatmap, line_plot


def _grouped(rows: Sequence[dict], key: str) -> dict[Any, list[dict]]:
    groups: dict[Any, list[dict]] = {}
    for row in rows:
        groups.setdefault(row[key], []).append(row)
    return groups


def mso_vs_eta(
    by_module: Sequence[dict], model: Sequence[dict], path: str | os.PathLike, title: str = "Mode Subspace Overlap"
) -> Path:
    """MSO against η: one line per module type, the model mean in bold, the random baseline dashed."""
    series = {
        module: ([r["eta"] for r in group], [r["mso"] for r in group])
        for module, group in _grouped(by_module, "module").items()
    }
    etas = [r["eta"] for r in model]
    series["model mean"] = (etas, [r["mso"] for r in model])
    return line_plot(
        series,
        path,
        baseline=(etas, [r["baseline"] for r in model]),
        baseline_label="random baseline (model mean)",
        emphasize="model mean",
        title=title,
        xlabel="energy share η",
        ylabel="MSO",
        ylim=(0.0, 1.02),
    )


def ratio_heatmap(
    by_layer: Sequence[dict], path: str | os.PathLike, title: str = "MSO / random baseline"
) -> Path | None:
    """Layer × η heatmap of the per-layer ratio of mean MSO to mean baseline (None without layered tensors)."""
    if not by_layer:
        return None
    layers = sorted({r["layer"] for r in by_layer})
    etas = sorted({r["eta"] for r in by_layer})
    cell = {(r["layer"], r["eta"]): r["ratio"] for r in by_layer}
    return heatmap(
        [[cell.get((layer, eta), float("nan")) for eta in etas] for layer in layers],
        path,
        row_labels=[str(layer) for layer in layers],
        col_labels=[f"{eta:g}" for eta in etas],
        title=title,
        xlabel="energy share η",
        ylabel="layer",
        colorbar_label="MSO / baseline",
        center=1.0,
    )


def energy_kept(pooled: Sequence[dict], path: str | os.PathLike, title: str = "Update energy kept by P_k") -> Path:
    """Pooled energy share against frac, one line per selection, the random-subspace expectation dashed."""
    if not pooled:
        raise ValueError("no pooled energy rows to plot")
    groups = _grouped(pooled, "selection")
    series = {
        selection: ([r["frac"] for r in group], [r["share"] for r in group]) for selection, group in groups.items()
    }
    first = next(iter(groups.values()))
    return line_plot(
        series,
        path,
        baseline=([r["frac"] for r in first], [r["random_share"] for r in first]),
        baseline_label="random subspace (expected)",
        title=title,
        xlabel="rank fraction k / min(m, n)",
        ylabel="share of ‖Δ‖² kept",
        ylim=(0.0, 1.02),
    )
