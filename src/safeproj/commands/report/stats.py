"""Per-cell statistics of a report: the mean over seeds with its seeded percentile-bootstrap 95 % interval,
counting missing values instead of filling them in, and the interval of a difference of two groups."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from safeproj.eval.stats import bootstrap_ci
from safeproj.io import plain_float

MISSING = "—"


@dataclass
class Stat:
    """Mean over the values a cell has, its 95 % bootstrap interval, and how many of `total` had one."""

    mean: float
    low: float
    high: float
    n: int
    total: int

    def cell(self, digits: int = 3) -> str:
        """The table cell: "mean [low, high] n=k", "mean (n=1, CI n/a)" or MISSING."""
        if self.n == 0:
            return MISSING
        count = f"n={self.n}" if self.n == self.total else f"n={self.n}/{self.total}"
        if self.n == 1:
            return f"{self.mean:.{digits}f} ({count}, CI n/a)"
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}] {count}"

    def as_dict(self, prefix: str) -> dict[str, Any]:
        """`prefix`, `prefix_ci_low`, `prefix_ci_high` (None where not finite) and `prefix_n`."""
        return {
            prefix: plain_float(self.mean),
            f"{prefix}_ci_low": plain_float(self.low),
            f"{prefix}_ci_high": plain_float(self.high),
            f"{prefix}_n": self.n,
        }


def summarize(values: Sequence[float | None], n_boot: int = 1000, seed: int = 0) -> Stat:
    """Mean and percentile-bootstrap 95 % CI of the present values (None/NaN are missing, not zero)."""
    present = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not present:
        return Stat(math.nan, math.nan, math.nan, 0, len(values))
    mean = float(np.mean(present))
    if len(present) == 1:
        return Stat(mean, math.nan, math.nan, 1, len(values))
    low, high = bootstrap_ci(present, n_boot=n_boot, seed=seed)
    return Stat(mean, low, high, len(present), len(values))


def difference_ci(a: Sequence[float], b: Sequence[float], n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap 95 % CI of mean(b) − mean(a), resampling each group on its own."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.size < 2 or y.size < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    diffs = y[rng.integers(0, y.size, (n_boot, y.size))].mean(1) - x[rng.integers(0, x.size, (n_boot, x.size))].mean(1)
    low, high = np.quantile(diffs, [0.025, 0.975])
    return float(low), float(high)
