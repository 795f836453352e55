"""Seeded percentile-bootstrap confidence intervals and the utility / harm reports built on them."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# Resamples drawn per chunk: bounds memory at CHUNK * n indices whatever n_boot is.
CHUNK = 256


def bootstrap_ci(
    values: Sequence[float], n_boot: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean; NaN values are dropped, (nan, nan) if none remain."""
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    x = np.asarray(values, dtype=np.float64).ravel()
    x = x[~np.isnan(x)]
    if x.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for start in range(0, n_boot, CHUNK):
        stop = min(start + CHUNK, n_boot)
        idx = rng.integers(0, x.size, size=(stop - start, x.size))
        means[start:stop] = x[idx].mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(low), float(high)


def mean_with_ci(values: Sequence[float], name: str, n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
    """{name, name_ci_low, name_ci_high} for the NaN-excluded mean of `values`."""
    x = np.asarray(values, dtype=np.float64).ravel()
    x = x[~np.isnan(x)]
    low, high = bootstrap_ci(x, n_boot=n_boot, seed=seed)
    return {name: float(x.mean()) if x.size else math.nan, f"{name}_ci_low": low, f"{name}_ci_high": high}


def utility_report(rows: Sequence[dict], n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
    """Strict and flexible GSM8k accuracy with 95 % CIs from per-sample rows."""
    out: dict[str, float] = {"n": float(len(rows))}
    for kind in ("strict", "flexible"):
        flags = [float(r[f"{kind}_correct"]) for r in rows]
        out.update(mean_with_ci(flags, f"{kind}_acc", n_boot, seed))
    return out


def harm_report(rows: Sequence[dict], n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
    """Harm summary with 95 % CIs from per-sample rows holding "score" (NaN = unscored),
    "failure" ("parse" / "request" / None) and "refusal" (bool or None).

    Unscored rows are left out of the score means but counted in `unscored` and `parse_failures`.
    """
    scores = np.asarray([r["score"] for r in rows], dtype=np.float64)
    scored = scores[~np.isnan(scores)]
    refusals = [float(r["refusal"]) for r in rows if r.get("refusal") is not None]
    out: dict[str, float] = {
        "n": float(len(rows)),
        "n_scored": float(scored.size),
        "unscored": float(len(rows) - scored.size),
        "parse_failures": float(sum(r.get("failure") == "parse" for r in rows)),
    }
    out.update(mean_with_ci(scored, "mean_score", n_boot, seed))
    out.update(mean_with_ci((scored == 5).astype(np.float64), "share_5", n_boot, seed))
    out.update(mean_with_ci(refusals, "refusal_rate", n_boot, seed))
    return out
