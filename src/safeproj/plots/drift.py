"""The drift figure: share of a run's update inside a subspace, layers × optimizer steps."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from safeproj.plots import heatmap


def drift_heatmap(
    values: Sequence[Sequence[float]],
    row_labels: Sequence[str],
    steps: Sequence[int],
    baseline: float,
    path: str | os.PathLike,
) -> Path:
    """Heatmap of per-layer mean shares (rows: layers, then the pooled `overall`; columns: steps).

    Layer rows average their weights' shares; `overall` pools energy, so it weighs large updates more.
    """
    return heatmap(
        values,
        path,
        row_labels=list(row_labels),
        col_labels=[str(s) for s in steps],
        title=f"Update energy in the subspace (pooled random {baseline:.2f})",
        xlabel="optimizer step",
        ylabel="layer",
        colorbar_label="‖PΔW‖² / ‖ΔW‖²",
    )
