"""Figures of `safeproj report`, drawn from plain numbers: utility-vs-harm curves, a Pareto plot of every
projected variant, and MSO against the energy share η."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from safeproj.plots import new_figure, save_png


class Estimate(NamedTuple):
    """A mean and its 95 % interval; the bounds are NaN where there is no interval (a single value)."""

    mean: float
    low: float = math.nan
    high: float = math.nan

    @property
    def has_interval(self) -> bool:
        return math.isfinite(self.low)


class TradeoffPoint(NamedTuple):
    """One point of a utility-vs-harm curve: its x value (frac or η) and both metrics."""

    x: float
    utility: Estimate
    harm: Estimate


class VariantGroup(NamedTuple):
    """The variants of one table for the Pareto plot: (selection, utility, harm) means and the reference."""

    title: str
    points: Sequence[tuple[str, float, float]]
    reference: tuple[float, float] | None = None


PARETO_MARKERS = {"top": "o", "random-k": "s", "random": "^", "full": "*"}


def plot_tradeoff(
    curves: Mapping[str, Sequence[TradeoffPoint]],
    path: str | os.PathLike,
    *,
    title: str,
    utility: str,
    harm: str,
    reference: tuple[str, Estimate, Estimate] | None = None,
) -> Path | None:
    """Utility (x) against harm (y), one line per curve through its points, with 95 % CIs; None if empty.

    Curve i is drawn in colour Ci even when other curves are empty, so a selection keeps its colour
    across tables. `reference` is a labelled point (e.g. the unprojected model) drawn as a star.
    """
    fig = new_figure()
    ax = fig.add_subplot()
    drawn = 0
    for i, (name, points) in enumerate(curves.items()):
        if not points:
            continue
        drawn += 1
        us, hs = [p.utility for p in points], [p.harm for p in points]
        ax.errorbar(
            [u.mean for u in us], [h.mean for h in hs], xerr=_error_bars(us), yerr=_error_bars(hs), **_line(i, name)
        )
        for point in points:
            ax.annotate(
                f"{point.x:g}",
                (point.utility.mean, point.harm.mean),
                textcoords="offset points",
                xytext=(3, 3),
                fontsize=6,
            )
    if reference is not None:
        label, u, h = reference
        ax.errorbar(
            [u.mean],
            [h.mean],
            xerr=_error_bars([u]),
            yerr=_error_bars([h]),
            marker="*",
            markersize=11,
            color="black",
            linestyle="none",
            label=label,
        )
        drawn += 1
    if not drawn:
        return None
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(utility)
    ax.set_ylabel(f"{harm} (lower is better)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return save_png(fig, path)


def _line(i: int, label: str) -> dict:
    """The style of curve i: colour Ci, so a selection keeps its colour across figures."""
    return {"marker": "o", "markersize": 4, "capsize": 2, "linewidth": 1.3, "color": f"C{i}", "label": label}


def _error_bars(estimates: Sequence[Estimate]) -> np.ndarray | None:
    """Matplotlib's (2, n) distances below and above each mean; 0 where a point has no interval."""
    if not any(e.has_interval for e in estimates):
        return None
    low = [e.mean - e.low if e.has_interval else 0.0 for e in estimates]
    high = [e.high - e.mean if e.has_interval else 0.0 for e in estimates]
    return np.array([low, high])


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of points no other point beats on both utility (higher) and harm (lower), by utility."""
    front = []
    for i, (u, h) in enumerate(points):
        dominated = any((u2 >= u and h2 <= h) and (u2 > u or h2 < h) for j, (u2, h2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def plot_pareto(
    groups: Sequence[VariantGroup],
    path: str | os.PathLike,
    *,
    utility: str,
    harm: str,
    utility_lower_is_better: bool = False,
) -> Path | None:
    """Every variant and reference as a point, one colour per group; the Pareto front (best utility, min
    harm) drawn through them. None when there is no point."""
    points = []
    fig = new_figure(7.2, 5.0)
    ax = fig.add_subplot()
    for i, group in enumerate(groups):
        for selection, u, h in group.points:
            ax.scatter([u], [h], marker=PARETO_MARKERS.get(selection, "D"), color=f"C{i % 10}", s=22, alpha=0.85)
            points.append((u, h))
        if group.reference is not None:
            u, h = group.reference
            ax.scatter([u], [h], marker="*", color=f"C{i % 10}", s=90, edgecolors="black")
            points.append((u, h))
    if not points:
        return None
    # A loss-like utility (answer NLL) is better when lower: the front is found on its negation.
    sign = -1.0 if utility_lower_is_better else 1.0
    front = sorted(pareto_front([(sign * u, h) for u, h in points]), key=lambda i: points[i][0])
    ax.plot(
        [points[i][0] for i in front],
        [points[i][1] for i in front],
        color="black",
        linewidth=1.2,
        linestyle="--",
        label="Pareto front",
    )
    for i, group in enumerate(groups):
        ax.scatter([], [], color=f"C{i % 10}", label=group.title[:60])
    for selection, marker in PARETO_MARKERS.items():
        ax.scatter([], [], color="gray", marker=marker, label=selection)
    ax.set_xlabel(f"{utility} ({'lower' if utility_lower_is_better else 'higher'} is better)")
    ax.set_ylabel(f"{harm} (lower is better)")
    ax.set_title("Utility vs harm of every variant")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="x-small")
    return save_png(fig, path)


def plot_mso(curves: Mapping[str, Mapping[float, tuple[Estimate, Estimate]]], path: str | os.PathLike) -> Path | None:
    """MSO against η per pair: (mso, random baseline) estimates by η; the mean with its 95 % band over
    seeds, the baseline dashed. None when there is no pair."""
    if not curves:
        return None
    fig = new_figure()
    ax = fig.add_subplot()
    for i, (label, by_eta) in enumerate(curves.items()):
        etas = list(by_eta)
        mso = [by_eta[eta][0] for eta in etas]
        baseline = [by_eta[eta][1] for eta in etas]
        ax.plot(etas, [e.mean for e in mso], marker="o", markersize=3, color=f"C{i}", label=label)
        if any(e.has_interval for e in mso):
            low = [e.low if e.has_interval else e.mean for e in mso]
            high = [e.high if e.has_interval else e.mean for e in mso]
            ax.fill_between(etas, low, high, color=f"C{i}", alpha=0.2)
        ax.plot(etas, [e.mean for e in baseline], linestyle="--", color=f"C{i}", linewidth=1, alpha=0.8)
    ax.plot([], [], linestyle="--", color="gray", label="random baseline (dashed)")
    ax.set_xlabel("energy share η")
    ax.set_ylabel("MSO (model mean)")
    ax.set_ylim(0.0, 1.02)
    ax.set_title("Mode Subspace Overlap (mean and 95 % CI over seeds)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return save_png(fig, path)


def plot_retention_energy(
    curves: Mapping[str, Sequence[tuple[float, Estimate]]], path: str | os.PathLike, *, title: str
) -> Path | None:
    """Retention (y, with 95 % CIs) against the share of the update's energy a variant keeps (x), one line per
    curve, with the diagonal R = energy kept: a subspace that keeps more of a metric's change than of the
    update's energy lies above it. None when there is no point."""
    fig = new_figure()
    ax = fig.add_subplot()
    drawn = 0
    for i, (name, points) in enumerate(curves.items()):
        points = sorted((x, e) for x, e in points if math.isfinite(x) and math.isfinite(e.mean))
        if not points:
            continue
        drawn += 1
        estimates = [e for _, e in points]
        ax.errorbar([x for x, _ in points], [e.mean for e in estimates], yerr=_error_bars(estimates), **_line(i, name))
    if not drawn:
        return None
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=1, label="R = energy kept")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xlim(0, 1)
    ax.set_xlabel("energy kept: share of ‖Δ_T‖² in the variant")
    ax.set_ylabel("retention R of the fine-tune's change")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return save_png(fig, path)
