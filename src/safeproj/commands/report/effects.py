"""Effect sizes of post hoc grids from the runs' per-item values, with intervals over items nested in seeds.

The likelihood evaluators write `<run>/utility_items.json` and `<run>/harm_items.json`: every evaluation's
per-item values, in order (the start model, then the post hoc variants in the order of the run's post hoc
rows). Every variant of a run is scored on the same items, so everything here is paired:

- the fine-tune's change (full − start) per metric, with z = estimate / bootstrap SE;
- each variant's retention R = (start − variant) / (start − full), for metrics whose change is resolved;
- R(top) − R(random) and R(top) − R(random-k) at each frac: does the top-k subspace keep more than chance?
- R_harm − R_utility of one variant (the orthogonal experiment: a distinct safety subspace would remove
  harm and keep utility) and across the parallel pair (harm kept of the harmful fine-tune minus utility
  kept of the useful fine-tune, same selection and frac).

Intervals: `safeproj.eval.stats.nested_bootstrap` (seeds resampled, then items within each seed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from safeproj.commands.report.load import Run, read_json
from safeproj.commands.report.tables import markdown_table, variant_row
from safeproj.eval.stats import Effect, nested_bootstrap, retention

# A fine-tune's change counts as resolved at |z| >= this; retention of an unresolved change is a ratio of noise.
RESOLVED_Z = 3.0
Z_95 = 1.959964

Key = Any  # "start", "full" or (selection, frac)


def items_file(run: Run, prefix: str):
    return run.dir / f"{prefix}_items.json"


def _values(evaluation: dict[str, Any], metric: str) -> np.ndarray | None:
    items = sorted(evaluation.get("items") or [], key=lambda row: row.get("item", 0))
    values = [row.get(metric) for row in items]
    if not values or any(v is None or not math.isfinite(float(v)) for v in values):
        return None
    return np.asarray(values, dtype=np.float64)


def run_items(run: Run, prefix: str, metric: str) -> dict[Key, np.ndarray]:
    """One run's per-item values of `metric` by variant: "start", "full" and (selection, frac).

    The post hoc evaluations are matched to the run's post hoc rows in order, and each match is checked
    against the row's own value; a run whose items do not match its rows gives {} (nothing is guessed).
    """
    path = items_file(run, prefix)
    if not path.is_file():
        return {}
    evaluations = read_json(path).get("evaluations") or []
    out: dict[Key, np.ndarray] = {}
    start = next((e for e in evaluations if e.get("label") == "start"), None)
    if start is not None and (values := _values(start, metric)) is not None:
        out["start"] = values
    scored = [e for e in evaluations if e.get("label") in ("full", "evaluate")]
    if len(scored) != len(run.posthoc):
        return out if not run.posthoc else {}
    for evaluation, row in zip(scored, run.posthoc):
        value, expected = evaluation.get("metrics", {}).get(metric), row.get(f"{prefix}/{metric}")
        if value is None or expected is None or not math.isclose(value, expected, rel_tol=1e-9, abs_tol=1e-12):
            return {}
        if row.get("variant") == "full":
            key: Key = "full"
        elif row.get("frac") is not None:
            key = (row.get("selection"), float(row["frac"]))
        else:
            continue
        values = _values(evaluation, metric)
        if values is not None:
            out[key] = values
    return out


@dataclass
class CellItems:
    """One cell's per-item values of one metric: (seeds, items) arrays by variant, rows in `seeds` order."""

    metric: str
    seeds: list[int | None]
    values: dict[Key, np.ndarray] = field(default_factory=dict)

    def aligned(self, other: CellItems) -> tuple[list[int], list[int]]:
        """Row indices of the seeds both cells have, in the same order."""
        common = [s for s in self.seeds if s in other.seeds]
        return [self.seeds.index(s) for s in common], [other.seeds.index(s) for s in common]


def cell_items(runs: Sequence[Run], prefix: str, metric: str) -> CellItems | None:
    """The cell's variants measured with the same number of items in every run that has them."""
    found = [(run.seed, run_items(run, prefix, metric)) for run in sorted(runs, key=lambda r: (r.seed is None, r.seed))]
    found = [(seed, values) for seed, values in found if "start" in values and "full" in values]
    if not found:
        return None
    keys = set.intersection(*(set(values) for _, values in found))
    sizes = {values["start"].size for _, values in found}
    if len(sizes) != 1 or any(values[k].size not in sizes for _, values in found for k in keys):
        return None
    return CellItems(
        metric=f"{prefix}/{metric}",
        seeds=[seed for seed, _ in found],
        values={k: np.stack([values[k] for _, values in found]) for k in keys},
    )


@dataclass(frozen=True)
class Measured:
    """An effect with its z (estimate over the bootstrap SE taken from the interval's width)."""

    effect: Effect

    @property
    def z(self) -> float:
        width = self.effect.high - self.effect.low
        return self.effect.estimate / (width / (2 * Z_95)) if width > 0 else math.nan

    def cell(self, digits: int = 3) -> str:
        e = self.effect
        if not math.isfinite(e.estimate):
            return "—"
        return f"{e.estimate:+.{digits}f} [{e.low:+.{digits}f}, {e.high:+.{digits}f}]"

    @property
    def n(self) -> str:
        return f"{self.effect.n_seeds} seeds × {'/'.join(str(n) for n in self.effect.n_items)} items"

    def as_row(self, **labels: Any) -> dict[str, Any]:
        e = self.effect
        return {
            **labels,
            "effect": e.name,
            "estimate": e.estimate,
            "ci_low": e.low,
            "ci_high": e.high,
            "z": self.z,
            "n_seeds": e.n_seeds,
            "n_items": list(e.n_items),
            "verdict": e.verdict,
        }


def _effect(name: str, arrays: Sequence[np.ndarray], statistic, n_boot: int, seed: int) -> Measured:
    estimate, low, high = nested_bootstrap(arrays, statistic, n_boot=n_boot, seed=seed)
    n_items = tuple(int(a.shape[1]) for a in arrays)
    return Measured(Effect(name, estimate, low, high, int(arrays[0].shape[0]), n_items))


def change(cell: CellItems, n_boot: int, seed: int = 0) -> Measured:
    """full − start of the cell's metric, per item."""
    d = cell.values["full"] - cell.values["start"]
    return _effect(f"{cell.metric}: full − start", [d], lambda m: m[0][:, 0], n_boot, seed)


def _retentions(means: np.ndarray, variants: int) -> list[np.ndarray]:
    """Retention of columns 2.. of (B, 2 + variants) means whose columns 0 and 1 are start and full."""
    return [retention(means[:, 0], means[:, 1], means[:, 2 + i]) for i in range(variants)]


def retention_of(cell: CellItems, key: Key, n_boot: int, seed: int = 0) -> Measured:
    """R of one variant."""
    stacked = np.stack([cell.values["start"], cell.values["full"], cell.values[key]], axis=-1)
    return _effect(f"R {cell.metric}", [stacked], lambda m: _retentions(m[0], 1)[0], n_boot, seed)


def retention_difference(cell: CellItems, a: Key, b: Key, n_boot: int, seed: int = 0) -> Measured:
    """R(a) − R(b) of two variants of one cell (the same items, so paired)."""
    v = cell.values
    stacked = np.stack([v["start"], v["full"], v[a], v[b]], axis=-1)

    def statistic(means):
        ra, rb = _retentions(means[0], 2)
        return ra - rb

    return _effect(f"R {cell.metric}: {a[0]} − {b[0]}", [stacked], statistic, n_boot, seed)


def harm_minus_utility(
    harm: CellItems, harm_keys: Key | tuple, utility: CellItems, utility_keys: Key | tuple, n_boot: int, seed: int = 0
) -> Measured | None:
    """R_harm − R_utility of one variant, or with two variants (top, other) the difference of differences
    (R_harm − R_utility)(top) − (R_harm − R_utility)(other): what the top-k subspace does to harm beyond
    utility, over what other directions do. The two cells' runs are paired by seed (one cell twice within a
    run); a variant key is (selection, frac)."""
    rows_h, rows_u = harm.aligned(utility)
    if not rows_h:
        return None
    harm_keys = [harm_keys] if isinstance(harm_keys[0], str) else list(harm_keys)
    utility_keys = [utility_keys] if isinstance(utility_keys[0], str) else list(utility_keys)
    h = np.stack([harm.values[k][rows_h] for k in ("start", "full", *harm_keys)], axis=-1)
    u = np.stack([utility.values[k][rows_u] for k in ("start", "full", *utility_keys)], axis=-1)
    variants = len(harm_keys)

    def statistic(means):
        gaps = [rh - ru for rh, ru in zip(_retentions(means[0], variants), _retentions(means[1], variants))]
        return gaps[0] if variants == 1 else gaps[0] - gaps[1]

    name = "R_harm − R_utility" if variants == 1 else "(R_harm − R_utility): top − other"
    return _effect(name, [h, u], statistic, n_boot, seed)


# ---------------------------------------------------------------- the report's section

SELECTIONS = ("top", "random-k", "random")


@dataclass
class CellEffects:
    """A post hoc cell's per-item values of the report's two metrics and its fine-tune's changes."""

    label: str
    keep: str
    runs: list[Run]
    items: dict[str, CellItems]  # "utility" / "harm"
    changes: dict[str, Measured]

    def resolved(self, kind: str) -> bool:
        return kind in self.changes and abs(self.changes[kind].z) >= RESOLVED_Z

    def points(self) -> list[tuple[str, float]]:
        keys = set.intersection(*(set(c.values) for c in self.items.values())) if self.items else set()
        order = {s: i for i, s in enumerate(SELECTIONS)}
        found = [k for k in keys if isinstance(k, tuple)]
        return sorted(found, key=lambda k: (order.get(k[0], len(order)), k[0], k[1]))

    def energy_kept(self, point: tuple[str, float]) -> float:
        values = [variant_row(run, point).get("energy_kept") for run in self.runs]
        values = [float(v) for v in values if v is not None]
        return float(np.mean(values)) if values else math.nan


def cell_effects(cells: dict[str, list[Run]], utility_metric: str, harm_metric: str, n_boot: int) -> list[CellEffects]:
    """Every post hoc cell with per-item values of at least one of the two metrics."""
    out = []
    for label, runs in cells.items():
        if not any(r.posthoc for r in runs):
            continue
        items = {}
        for kind, name in (("utility", utility_metric), ("harm", harm_metric)):
            prefix, _, metric = name.partition("/")
            found = cell_items(runs, prefix, metric) if prefix == kind else None
            if found is not None:
                items[kind] = found
        if not items:
            continue
        keeps = sorted({row["keep"] for r in runs for row in r.posthoc if row.get("keep") not in (None, "none")})
        changes = {kind: change(found, n_boot) for kind, found in items.items()}
        out.append(CellEffects(label, "/".join(keeps) or "parallel", list(runs), items, changes))
    return out


def _retention_cell(cell: CellEffects, kind: str, point, n_boot: int) -> tuple[str, Measured | None]:
    if not cell.resolved(kind):
        return "— (change unresolved)" if kind in cell.items else "—", None
    measured = retention_of(cell.items[kind], point, n_boot)
    return measured.cell(), measured


def effects_section(
    effects: Sequence[CellEffects], n_boot: int
) -> tuple[list[str], list[dict[str, Any]], dict[str, dict[str, list[tuple[float, Measured]]]]]:
    """The report's effect-size section: (markdown lines, JSON rows, retention-vs-energy series per cell).

    The series map cell title -> "selection (metric)" -> (energy kept, retention) points.
    """
    lines = [
        "## Effect sizes (items nested in seeds)",
        "",
        "Paired per item within each run; 95 % intervals from a bootstrap that resamples seeds, then items within "
        f"each seed ({n_boot} resamples). z = estimate / bootstrap SE. Retention R = (start − variant) / "
        f"(start − full): 1 keeps the fine-tune's whole change, 0 none of it; shown only where the fine-tune's "
        f"change is resolved (|z| ≥ {RESOLVED_Z:g}). An interval that spans zero is *inconclusive*.",
        "",
        "### What each fine-tune changed (full − start)",
        "",
    ]
    rows: list[dict[str, Any]] = []
    table = []
    for cell in effects:
        for kind, measured in cell.changes.items():
            items = cell.items[kind]
            start, full = items.values["start"].mean(), items.values["full"].mean()
            table.append(
                [
                    cell.label,
                    items.metric,
                    f"{start:.3f}",
                    f"{full:.3f}",
                    measured.cell(),
                    f"{measured.z:.1f}",
                    measured.n,
                ]
            )
            rows.append(measured.as_row(table="effects", cell=cell.label, metric=items.metric, kind="change"))
    lines += [*markdown_table(["cell", "metric", "start", "full", "full − start [95 % CI]", "z", "n"], table), ""]

    series: dict[str, dict[str, list[tuple[float, Measured]]]] = {}
    for cell in effects:
        lines += [f"### {cell.label}: retention per variant ({cell.keep})", ""]
        table = []
        for point in cell.points():
            energy = cell.energy_kept(point)
            texts, measured = {}, {}
            for kind in ("utility", "harm"):
                texts[kind], measured[kind] = _retention_cell(cell, kind, point, n_boot)
                if measured[kind] is not None:
                    rows.append(
                        measured[kind].as_row(
                            table="effects",
                            cell=cell.label,
                            metric=cell.items[kind].metric,
                            kind="retention",
                            selection=point[0],
                            frac=point[1],
                            energy_kept=energy,
                        )
                    )
                    series.setdefault(cell.label, {}).setdefault(f"{point[0]} ({kind})", []).append(
                        (energy, measured[kind])
                    )
            difference = "—"
            if measured["utility"] is not None and measured["harm"] is not None:
                d = harm_minus_utility(cell.items["harm"], point, cell.items["utility"], point, n_boot)
                difference = f"{d.cell()} {d.effect.verdict}"
                rows.append(
                    d.as_row(
                        table="effects", cell=cell.label, kind="harm_minus_utility", selection=point[0], frac=point[1]
                    )
                )
            table.append([point[0], f"{point[1]:g}", f"{energy:.3f}", texts["utility"], texts["harm"], difference])
        header = ["selection", "frac", "energy kept", "R utility [95 % CI]", "R harm [95 % CI]", "R_harm − R_utility"]
        lines += [*markdown_table(header, table), ""]

    table = []
    for cell in effects:
        for kind in ("utility", "harm"):
            if not cell.resolved(kind):
                continue
            items = cell.items[kind]
            for top in [p for p in cell.points() if p[0] == "top"]:
                for other in ("random", "random-k"):
                    if (other, top[1]) not in items.values:
                        continue
                    d = retention_difference(items, top, (other, top[1]), n_boot)
                    table.append(
                        [cell.label, items.metric, f"{top[1]:g}", f"top − {other}", d.cell(), d.effect.verdict, d.n]
                    )
                    rows.append(
                        d.as_row(
                            table="effects",
                            cell=cell.label,
                            metric=items.metric,
                            kind="top_minus_random",
                            against=other,
                            frac=top[1],
                        )
                    )
    if table:
        lines += [
            "### Does the top-k subspace keep more than random directions? R(top) − R(other)",
            "",
            *markdown_table(["cell", "metric", "frac", "difference", "R difference [95 % CI]", "verdict", "n"], table),
            "",
        ]

    # Harm against utility: the parallel pair (harmful run's harm, useful run's utility) and every other
    # post hoc cell that moved both (the mixed run under P_k⊥).
    comparisons = [(f"{h.label} − {u.label}", h, u, "parallel") for h, u in parallel_pairs(effects)]
    comparisons += [
        (cell.label, cell, cell, cell.keep)
        for cell in effects
        if cell.keep != "parallel" and cell.resolved("harm") and cell.resolved("utility")
    ]
    table = []
    for label, harmful, useful, keep in comparisons:
        points = [p for p in harmful.points() if p in useful.points()]
        for point in points:
            d = harm_minus_utility(harmful.items["harm"], point, useful.items["utility"], point, n_boot)
            if d is not None:
                table.append([label, keep, point[0], f"{point[1]:g}", d.cell(), d.effect.verdict, d.n])
                rows.append(d.as_row(table="effects", cell=label, kind="harm_minus_utility_" + keep,
                                     selection=point[0], frac=point[1]))  # fmt: skip
        for top in [p for p in points if p[0] == "top"]:
            for other in [(s, top[1]) for s in ("random", "random-k") if (s, top[1]) in points]:
                d = harm_minus_utility(
                    harmful.items["harm"], (top, other), useful.items["utility"], (top, other), n_boot
                )
                if d is not None:
                    table.append([label, keep, f"top − {other[0]}", f"{top[1]:g}", d.cell(), d.effect.verdict, d.n])
                    rows.append(d.as_row(table="effects", cell=label, kind="harm_minus_utility_beyond_" + keep,
                                         selection=f"top-{other[0]}", frac=top[1]))  # fmt: skip
    if table:
        header = ["cells (harm − utility)", "keep", "selection", "frac", "R_harm − R_utility [95 % CI]", "verdict", "n"]
        lines += [
            "### Harm against utility: R_harm − R_utility",
            "",
            "Parallel: harm kept of the harmful fine-tune minus utility kept of the useful one; a subspace that "
            "holds safety distinctly keeps more of the harmful update (positive). Orthogonal: harm kept minus "
            "utility kept of the same run under P_k⊥; a distinct safety subspace removes harm and keeps utility "
            "(negative). Rows `top − random` are the difference of differences: what the top-k subspace does "
            "beyond random directions of the same size.",
            "",
            *markdown_table(header, table),
            "",
        ]
    return lines, rows, series


def parallel_pairs(effects: Sequence[CellEffects]) -> list[tuple[CellEffects, CellEffects]]:
    """(harmful, useful) pairs of parallel cells in the same folder of a sweep: the cell whose fine-tune moved
    harm most and the one that moved utility most (by the size of each change), when they differ and both
    changes are resolved. Both fine-tunes usually move both metrics, so the larger change names the cell."""
    scopes: dict[str, list[CellEffects]] = {}
    for cell in effects:
        if cell.keep == "parallel" and {"utility", "harm"} <= set(cell.items):
            scopes.setdefault(cell.label.rpartition("/")[0], []).append(cell)
    pairs = []
    for cells in scopes.values():
        harmful = max(cells, key=lambda c: abs(c.changes["harm"].effect.estimate))
        useful = max(cells, key=lambda c: abs(c.changes["utility"].effect.estimate))
        if harmful is not useful and harmful.resolved("harm") and useful.resolved("utility"):
            pairs.append((harmful, useful))
    return pairs
