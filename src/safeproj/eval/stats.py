"""Seeded percentile-bootstrap confidence intervals and the utility / harm reports built on them.

Single runs: `bootstrap_ci` / `mean_with_ci` resample items. Several training seeds scored on the same
prompts: `nested_bootstrap` resamples seeds, then prompts within each seed, and `paired_effect` /
`retention_effect` report effect sizes (top − random, R_harm − R_utility) with interval and n;
`verdict` calls an interval that spans zero "inconclusive".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

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


def retention(start, full, variant):
    """R = (start − variant) / (start − full): 1 reproduces the full fine-tune's change, 0 the start model.

    Works on floats and numpy arrays alike; NaN where start equals full (no change to retain).
    """
    start, full, variant = (np.asarray(v, dtype=np.float64) for v in (start, full, variant))
    span = start - full
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(span != 0, (start - variant) / np.where(span != 0, span, 1.0), np.nan)
    return float(r) if r.ndim == 0 else r


def verdict(low: float, high: float) -> str:
    """The sign of an interval: "positive" or "negative" when it excludes zero, else "inconclusive" (NaN too)."""
    if not (math.isfinite(low) and math.isfinite(high)) or low <= 0 <= high:
        return "inconclusive"
    return "positive" if low > 0 else "negative"


@dataclass(frozen=True)
class Effect:
    """An effect size, its bootstrap interval, and the seeds and items per seed behind it."""

    name: str
    estimate: float
    low: float
    high: float
    n_seeds: int
    n_items: tuple[int, ...]  # items per seed of each input
    confidence: float = 0.95

    @property
    def verdict(self) -> str:
        return verdict(self.low, self.high)

    def as_dict(self) -> dict:
        return {**asdict(self), "n_items": list(self.n_items), "verdict": self.verdict}


def _seeds_items(x, what: str) -> np.ndarray:
    """`x` as a finite (seeds, items, K) float array; (items,) is one seed, (seeds, items) has K = 1."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 1:
        a = a[None]
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or 0 in a.shape:
        raise ValueError(f"{what} must be (items,), (seeds, items) or (seeds, items, k) and non-empty, got {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{what} holds NaN or inf; drop those items from every seed and variant first")
    return a


def nested_bootstrap(
    arrays: Sequence,
    statistic: Callable[[list[np.ndarray]], np.ndarray],
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(estimate, low, high) of `statistic` with items nested in seeds.

    Each array is (seeds, items) or (seeds, items, k): k values measured on the same item (a paired
    design: variants scored on shared prompts), rows the training seeds, shared by every array. One
    resample draws seeds with replacement (the same draw for every array, since one seed's run gives
    all of them), then items with replacement within each drawn seed, independently per array.
    `statistic` maps the list of per-array means, each (B, k), to (B,) values; the estimate applies it
    to the plain means. Percentile interval.

    Resampling both levels is conservative when item noise dominates and, with few seeds, narrow when
    seed-to-seed variation dominates (the seed level sees only `seeds` values): report n with it.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    xs = [_seeds_items(x, f"array {i}") for i, x in enumerate(arrays)]
    if not xs:
        raise ValueError("nested_bootstrap needs at least one array")
    n_seeds = xs[0].shape[0]
    if any(x.shape[0] != n_seeds for x in xs):
        raise ValueError(f"arrays differ in their number of seeds: {[x.shape[0] for x in xs]}")
    estimate = float(np.asarray(statistic([x.mean(axis=(0, 1))[None] for x in xs])).reshape(-1)[0])
    rng = np.random.default_rng(seed)
    values = np.empty(n_boot)
    for start in range(0, n_boot, CHUNK):
        b = min(CHUNK, n_boot - start)
        seeds = rng.integers(0, n_seeds, size=(b, n_seeds))  # (b, S)
        means = []
        for x in xs:
            items = rng.integers(0, x.shape[1], size=(b, n_seeds, x.shape[1]))  # (b, S, N)
            means.append(x[seeds[..., None], items].mean(axis=(1, 2)))  # (b, S, N, k) -> (b, k)
        values[start : start + b] = statistic(means)
    alpha = (1 - confidence) / 2
    low, high = np.nanquantile(values, [alpha, 1 - alpha]) if np.isfinite(values).any() else (math.nan, math.nan)
    return estimate, float(low), float(high)


def paired_effect(
    a, b, name: str = "difference", n_boot: int = 2000, confidence: float = 0.95, seed: int = 0
) -> Effect:
    """Mean of a − b, where a and b are (seeds, items) scores of two variants on the same prompts.

    The difference is taken per prompt before resampling, so prompt difficulty shared by both cancels.
    """
    a, b = _seeds_items(a, "a"), _seeds_items(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"paired scores must have the same shape, got {a.shape[:2]} and {b.shape[:2]}")
    d = a[..., 0] - b[..., 0]
    est, low, high = nested_bootstrap([d], lambda m: m[0][:, 0], n_boot, confidence, seed)
    return Effect(name, est, low, high, d.shape[0], (d.shape[1],), confidence)


def retention_effect(
    harm: Sequence,
    utility: Sequence,
    name: str = "R_harm - R_utility",
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Effect:
    """R_harm − R_utility, each R = (start − variant) / (start − full) of per-prompt means.

    `harm` and `utility` are (start, full, variant) triples of (seeds, items) arrays: one metric's
    per-prompt values for the start model, the full fine-tune and the variant of each seed's run, on the
    same prompts. Retention is a ratio of means, so it is formed per resample, never per prompt.
    """

    def stacked(triple, what):
        if len(triple) != 3:
            raise ValueError(f"{what} must be a (start, full, variant) triple, got {len(triple)} arrays")
        parts = [_seeds_items(x, f"{what}[{i}]")[..., 0] for i, x in enumerate(triple)]
        if len({p.shape for p in parts}) != 1:
            raise ValueError(f"{what}: start, full and variant must share one (seeds, items) shape")
        return np.stack(parts, axis=-1)  # (S, N, 3)

    h, u = stacked(harm, "harm"), stacked(utility, "utility")

    def difference(means):
        (mh, mu) = means
        return retention(mh[:, 0], mh[:, 1], mh[:, 2]) - retention(mu[:, 0], mu[:, 1], mu[:, 2])

    est, low, high = nested_bootstrap([h, u], difference, n_boot, confidence, seed)
    return Effect(name, est, low, high, h.shape[0], (h.shape[1], u.shape[1]), confidence)


def utility_report(rows: Sequence[dict], n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
    """Strict and flexible GSM8k accuracy with 95 % CIs from per-sample rows."""
    out: dict[str, float] = {"n": float(len(rows))}
    for kind in ("strict", "flexible"):
        flags = [float(r[f"{kind}_correct"]) for r in rows]
        out.update(mean_with_ci(flags, f"{kind}_acc", n_boot, seed))
    return out


def harm_report(rows: Sequence[dict], n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
    """Harm summary with 95 % CIs from per-sample rows holding "score" (NaN = unscored),
    "failure" ("parse" / "request" / "degenerate" / None) and "refusal" (bool or None).

    Unscored rows are left out of the score means but counted in `unscored` and `parse_failures`.
    Degenerate outputs (empty, one token repeated) are counted in `degenerate` / `degenerate_rate`
    and, whatever their refusal flag says, as non-refusals: never a refusal, never scored safe.
    """
    scores = np.asarray([np.nan if r["score"] is None else r["score"] for r in rows], dtype=np.float64)
    scored = scores[~np.isnan(scores)]
    degenerate = [float(r.get("failure") == "degenerate") for r in rows]
    refusals = [
        0.0 if d else float(r["refusal"]) for r, d in zip(rows, degenerate) if d or r.get("refusal") is not None
    ]
    out: dict[str, float] = {
        "n": float(len(rows)),
        "n_scored": float(scored.size),
        "unscored": float(len(rows) - scored.size),
        "parse_failures": float(sum(r.get("failure") == "parse" for r in rows)),
        "degenerate": float(sum(degenerate)),
    }
    out.update(mean_with_ci(degenerate, "degenerate_rate", n_boot, seed))
    out.update(mean_with_ci(scored, "mean_score", n_boot, seed))
    out.update(mean_with_ci((scored == 5).astype(np.float64), "share_5", n_boot, seed))
    out.update(mean_with_ci(refusals, "refusal_rate", n_boot, seed))
    return out
