"""The report's tables from cells of runs: frac × selection tables (post hoc and online), the cells'
overview, MSO and activation summaries, comparisons, and the plain series its figures are drawn from."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from safeproj.commands.report.load import MsoResult, Run, cell_config, read_json, select_runs
from safeproj.commands.report.stats import MISSING, Stat, difference_ci, summarize
from safeproj.plots.report import Estimate, TradeoffPoint, VariantGroup

SELECTION_ORDER = ("full", "top", "random-k", "random")


@dataclass
class Table:
    """A frac × selection table of one metric for one cell (post hoc) or one family of cells (online)."""

    title: str
    slug: str
    kind: str  # "posthoc" or "online"
    # (selection, frac) -> metric -> values over runs (None = missing in that run)
    values: dict[tuple[str, float], dict[str, list[float | None]]]
    reference: dict[str, list[float | None]] | None = None  # unprojected / full fine-tuning
    reference_label: str = ""
    x_label: str = "frac"
    reference_column: str = "reference"  # the header of the reference's column, beside the grid as in the paper


def slug_of(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "table"


# What produced each metric a report may show; harm scores name their judge from the runs' configs.
METRIC_SOURCES = {
    "utility/answer_nll": "teacher-forced mean per-token NLL of the gold worked answer on held-out problems "
    "(UtilityLikelihoodEval); lower is better",
    "utility/flexible_acc": "exact match of the last number in greedy generations (UtilityEval, flexible extract)",
    "utility/strict_acc": "exact match of the `#### answer` line in greedy generations (UtilityEval, strict extract)",
    "harm/comply_margin": "mean per-token log-probability of a complying minus a refusing continuation of held-out "
    "harmful requests (HarmLikelihoodEval); a likelihood measure, no judge; lower is safer",
    "harm/nonrefusal_rate_keyword": "share of greedy responses without a refusal phrase (keyword proxy, not a judge)",
}
KEYWORD_JUDGE = "the refusal-phrase keyword proxy (RefusalJudge): 1 + 4 × non-refusal, not an LLM judge"


def _judges(runs: Sequence[Run]) -> list[str]:
    found = set()
    for run in runs:
        args = _callback(run.config, "HarmEval")
        if args is None:
            continue
        judge = args.get("judge")
        if judge is None or "RefusalJudge" in str(judge):
            found.add(KEYWORD_JUDGE)
        else:
            path = judge.get("class_path", "?") if isinstance(judge, dict) else str(judge)
            model = (judge.get("init_args") or {}).get("model") if isinstance(judge, dict) else None
            found.add(f"{path.rsplit('.', 1)[-1]}" + (f" with model {model}" if model else ""))
    return sorted(found)


def metric_legend(runs: Sequence[Run], metrics: Sequence[str]) -> list[str]:
    """A line per reported metric saying what produced it; judge scores name the judge(s) of the runs."""
    lines = []
    for metric in metrics:
        if metric in METRIC_SOURCES:
            lines.append(f"- `{metric}`: {METRIC_SOURCES[metric]}.")
        elif metric.startswith("harm/") and metric.removeprefix("harm/") in ("mean_score", "share_5", "refusal_rate"):
            judges = _judges(runs) or ["unknown (no HarmEval in the runs' configs)"]
            lines.append(f"- `{metric}`: judge score of greedy responses (HarmEval), judged by {'; '.join(judges)}.")
        else:
            lines.append(f"- `{metric}`: as logged by the runs.")
    return lines


def _callback(config: dict[str, Any], name: str) -> dict[str, Any] | None:
    for cb in (config.get("trainer") or {}).get("callbacks") or []:
        if isinstance(cb, dict) and str(cb.get("class_path", "")).rsplit(".", 1)[-1] == name:
            return cb.get("init_args") or {}
    return None


def _metric_lists(runs: Sequence[Run], getter) -> dict[str, list[float | None]]:
    names = sorted({k for r in runs for k in getter(r) if k.startswith(("utility/", "harm/"))})
    return {name: [getter(r).get(name) for r in runs] for name in names}


def variant_row(run: Run, point: tuple[str, float] | None) -> dict[str, Any]:
    """A run's post hoc row at (selection, frac), or its "full" row for None; {} when it has none."""
    for row in run.posthoc:
        if point is None and row.get("variant") == "full":
            return row
        if (
            point is not None
            and row.get("variant") != "full"
            and row.get("frac") is not None
            and (row.get("selection"), float(row["frac"])) == point
        ):
            return row
    return {}


def posthoc_tables(cells: dict[str, list[Run]]) -> list[Table]:
    """One table per cell with post hoc rows: every (selection, frac) variant, the full model as reference."""
    tables = []
    for label, runs in cells.items():
        if not any(r.posthoc for r in runs):
            continue
        rows = [row for r in runs for row in r.posthoc]
        keeps = sorted({row["keep"] for row in rows if row.get("keep") not in (None, "none")})
        points = sorted(
            {
                (row["selection"], float(row["frac"]))
                for row in rows
                if row.get("variant") != "full" and row.get("frac") is not None
            }
        )
        values = {
            point: {
                **_metric_lists(runs, lambda r, p=point: variant_row(r, p)),
                "energy_kept": [variant_row(r, point).get("energy_kept") for r in runs],
            }
            for point in points
        }
        has_full = any(row.get("variant") == "full" for row in rows)
        reference = _metric_lists(runs, lambda r: variant_row(r, None)) if has_full else None
        keep = "/".join(keeps) or "parallel"
        tables.append(
            Table(
                title=f"{label}: post hoc ({keep})",
                slug=slug_of(f"posthoc_{label}"),
                kind="posthoc",
                values=values,
                reference=reference,
                reference_label="full fine-tuning (no projection)",
                reference_column="full FT",
            )
        )
    return tables


def online_tables(cells: dict[str, list[Run]]) -> list[Table]:
    """One table per family of online-projection cells that differ only in frac/eta and selection."""
    families: dict[str, list[tuple[str, tuple[str, float], list[Run]]]] = {}
    meta: dict[str, tuple[str, str, str]] = {}
    for label, runs in cells.items():
        args = _callback(runs[0].config, "OnlineProjection")
        if args is None:
            continue
        selection = str(args.get("selection", "top"))
        eta = args.get("eta")
        x, x_label = (float(eta), "eta") if eta is not None else (float(args.get("frac", 0.5)), "frac")
        config = cell_config(runs[0].config, runs[0].seed_keys)
        family_args = _callback(config, "OnlineProjection")
        for key in ("frac", "eta", "selection"):
            family_args.pop(key, None)
        family = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:8]
        families.setdefault(family, []).append((label, (selection, x), runs))
        meta[family] = (runs[0].recipe, str(args.get("keep", "orthogonal")), x_label)
    names = {family: _family_name([label for label, _, _ in members]) for family, members in families.items()}
    tables = []
    for family, members in families.items():
        recipe, keep, x_label = meta[family]
        name = names[family] if list(names.values()).count(names[family]) == 1 else f"{names[family]} ({family})"
        values = {point: _metric_lists(runs, lambda r: r.metrics) for _, point, runs in members}
        reference, reference_label = None, ""
        plain = [
            (label, runs)
            for label, runs in cells.items()
            if runs[0].recipe == recipe and _callback(runs[0].config, "OnlineProjection") is None
        ]
        if len(plain) > 1:
            # Several unprojected cells of the recipe: take the one from the same sweep (label prefix).
            scope = members[0][0].rpartition("/")[0]
            plain = [(label, runs) for label, runs in plain if label.rpartition("/")[0] == scope]
        if len(plain) == 1:
            reference_label = f"no projection (cell {plain[0][0]})"
            reference = _metric_lists(plain[0][1], lambda r: r.metrics)
        tables.append(
            Table(
                title=f"{name}: online projection ({keep}, recipe {recipe})",
                slug=slug_of(f"online_{name}"),
                kind="online",
                values=values,
                reference=reference,
                reference_label=reference_label,
                x_label=x_label,
                reference_column="no projection",
            )
        )
    return tables


def _family_name(labels: Sequence[str]) -> str:
    """The cell labels' shared stem, without the grid's frac/eta/selection parts."""
    stems = {re.split(r"-(?:frac|eta|selection)=", label)[0] for label in labels}
    if len(stems) == 1:
        return stems.pop()
    # A prefix by characters on purpose: labels are names, not paths.
    return os.path.commonprefix(sorted(stems)).rstrip("-/") or "online"  # noqa: RUF071


def _selections(table: Table) -> list[str]:
    found = {s for s, _ in table.values}
    return [s for s in SELECTION_ORDER if s in found] + sorted(found - set(SELECTION_ORDER))


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """The lines of a markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def table_markdown(table: Table, metric: str, n_boot: int) -> list[str]:
    """One metric of a table in markdown, shaped as the paper's: a row per selection, a column per frac (or η),
    then the reference (the same model in every row), named again below the table."""
    xs = sorted({x for _, x in table.values})
    ref = None
    if table.reference is not None:
        ref = summarize(table.reference[metric], n_boot).cell() if metric in table.reference else MISSING
    rows = []
    for selection in _selections(table):
        cells = []
        for x in xs:
            values = table.values.get((selection, x))
            cells.append(summarize(values[metric], n_boot).cell() if values and metric in values else MISSING)
        rows.append([selection, *cells, *([ref] if ref is not None else [])])
    header = [f"selection \\ {table.x_label}", *[f"{x:g}" for x in xs]]
    header += [table.reference_column] if ref is not None else []
    lines = [f"**{metric}**", "", *markdown_table(header, rows)]
    if ref is not None:
        lines += ["", f"{table.reference_label}: {ref}"]
    return [*lines, ""]


def table_rows(table: Table, n_boot: int) -> list[dict[str, Any]]:
    """Long-format rows (one per selection × x) with every metric's mean and CI, for JSON/CSV/W&B."""
    out = []
    for (selection, x), metrics in sorted(table.values.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        row: dict[str, Any] = {"table": table.title, "kind": table.kind, "selection": selection, table.x_label: x}
        for name, values in metrics.items():
            row.update(summarize(values, n_boot).as_dict(name))
        out.append(row)
    if table.reference is not None:
        row = {"table": table.title, "kind": table.kind, "selection": "reference", table.x_label: None}
        for name, values in table.reference.items():
            row.update(summarize(values, n_boot).as_dict(name))
        out.append(row)
    return out


def overview_rows(cells: dict[str, list[Run]], metrics: Sequence[str], n_boot: int) -> list[list[str]]:
    """One row per cell: label, recipe, seeds and the final value of each metric."""
    rows = []
    for label, runs in cells.items():
        seeds = ",".join(str(r.seed) for r in sorted(runs, key=lambda r: (r.seed is None, r.seed or 0)))
        cells_ = [summarize([r.metrics.get(m) for r in runs], n_boot).cell() for m in metrics]
        rows.append([label, runs[0].recipe, seeds or "?", *cells_])
    return rows


def mso_summary(results: Sequence[MsoResult], n_boot: int) -> dict[str, dict[float, dict[str, Stat]]]:
    """Per pair label and η: model-mean MSO and baseline (mean over tensors per seed, then over seeds)."""
    # label -> η -> "mso"/"baseline" -> one model mean per seed
    per_seed: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for result in results:
        by_eta: dict[float, list[dict]] = defaultdict(list)
        for row in result.rows:
            if "eta" in row and "mso" in row:
                by_eta[float(row["eta"])].append(row)
        for eta, rows in by_eta.items():
            per_seed[result.label][eta]["mso"].append(float(np.mean([r["mso"] for r in rows])))
            per_seed[result.label][eta]["baseline"].append(float(np.mean([r.get("baseline", math.nan) for r in rows])))
    return {
        label: {eta: {k: summarize(v, n_boot) for k, v in stats.items()} for eta, stats in sorted(etas.items())}
        for label, etas in per_seed.items()
    }


def mso_markdown(summary: dict[str, dict[float, dict[str, Stat]]]) -> list[str]:
    """The MSO table: a row per pair and one for its random baseline, a column per η."""
    etas = sorted({eta for pair in summary.values() for eta in pair})
    rows = []
    for label, by_eta in summary.items():
        rows.append([label, *(by_eta[e]["mso"].cell() if e in by_eta else MISSING for e in etas)])
        rows.append(
            [f"{label} (random baseline)", *(by_eta[e]["baseline"].cell() if e in by_eta else MISSING for e in etas)]
        )
    return markdown_table(["pair \\ η", *[f"{e:g}" for e in etas]], rows)


def mso_rows(summary: dict[str, dict[float, dict[str, Stat]]]) -> list[dict[str, Any]]:
    """Long-format MSO rows (one per pair × η) with the MSO's and the baseline's mean and CI."""
    return [
        {
            "table": "mso",
            "kind": "mso",
            "pair": label,
            "eta": eta,
            **stats["mso"].as_dict("mso"),
            **stats["baseline"].as_dict("baseline"),
        }
        for label, by_eta in summary.items()
        for eta, stats in by_eta.items()
    ]


def activation_rows(cells: dict[str, list[Run]], n_boot: int) -> list[list[str]]:
    """Per cell, layer and metric of `activations/analysis.json`: first, last and change over seeds."""
    rows = []
    for label, runs in cells.items():
        found = [r.dir / "activations" / "analysis.json" for r in runs]
        analyses = [read_json(f) for f in found if f.is_file()]
        if not analyses:
            continue
        grouped: dict[tuple[int, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for analysis in analyses:
            for change in analysis.get("changes") or []:
                key = (change["layer"], change["metric"])
                for part in ("first", "last", "change"):
                    grouped[key][part].append(change.get(part))
        etas = sorted({float(m.rpartition("@")[2]) for _, m in grouped if m.startswith("mso_") and "@" in m})
        keep_eta = min(etas, key=lambda e: abs(e - 0.5)) if etas else None
        for (layer, metric), parts in sorted(grouped.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            if metric.startswith("mso_") and "@" in metric and float(metric.rpartition("@")[2]) != keep_eta:
                continue  # one η in the table; analysis.json beside each run has them all
            stats = [summarize(parts[p], n_boot).cell() for p in ("first", "last", "change")]
            rows.append([label, str(layer), metric, *stats])
    return rows


def compare_lines(selectors: Sequence[str], runs: Sequence[Run], n_boot: int) -> list[str]:
    """A markdown section putting two groups of runs side by side, with the difference and its interval."""
    if len(selectors) != 2:
        raise ValueError(f"compare takes two runs or groups (a folder or a cell pattern each), got {len(selectors)}")
    a, b = (select_runs(s, runs) for s in selectors)
    names = sorted(
        {
            k
            for r in (*a, *b)
            for k, v in r.metrics.items()
            if not k.endswith(("_ci_low", "_ci_high")) and not k.endswith("/n")
        }
    )
    rows = []
    for name in names:
        va, vb = [r.metrics.get(name) for r in a], [r.metrics.get(name) for r in b]
        sa, sb = summarize(va, n_boot), summarize(vb, n_boot)
        if sa.n and sb.n:
            xa = [v for v in va if v is not None]
            xb = [v for v in vb if v is not None]
            low, high = difference_ci(xa, xb, n_boot)
            diff = f"{sb.mean - sa.mean:+.3f}" + (f" [{low:+.3f}, {high:+.3f}]" if math.isfinite(low) else " (CI n/a)")
        else:
            diff = MISSING
        rows.append([name, sa.cell(), sb.cell(), diff])
    header = ["metric", f"A: {selectors[0]} ({len(a)} runs)", f"B: {selectors[1]} ({len(b)} runs)", "B − A"]
    return ["## Comparison", "", *markdown_table(header, rows), ""]


# The series the report's figures are drawn from.


def _estimate(stat: Stat) -> Estimate:
    return Estimate(stat.mean, stat.low, stat.high)


def _measured_pair(
    metrics: dict[str, list[float | None]], utility: str, harm: str, n_boot: int
) -> tuple[Estimate, Estimate] | None:
    """Utility and harm of one table entry, or None unless some run measured both."""
    u, h = summarize(metrics.get(utility, []), n_boot), summarize(metrics.get(harm, []), n_boot)
    return (_estimate(u), _estimate(h)) if u.n and h.n else None


def tradeoff_curves(
    table: Table, utility: str, harm: str, n_boot: int
) -> tuple[dict[str, list[TradeoffPoint]], tuple[str, Estimate, Estimate] | None]:
    """A table's utility-vs-harm points measured for both metrics, per selection (every selection of the
    table, in table order, so colours match across tables), and its reference point."""
    curves: dict[str, list[TradeoffPoint]] = {}
    for selection in _selections(table):
        points = []
        for (s, x), metrics in sorted(table.values.items(), key=lambda kv: kv[0][1]):
            pair = _measured_pair(metrics, utility, harm, n_boot) if s == selection else None
            if pair is not None:
                points.append(TradeoffPoint(x, *pair))
        curves[selection] = points
    reference = None
    if table.reference is not None:
        pair = _measured_pair(table.reference, utility, harm, n_boot)
        reference = (table.reference_label, *pair) if pair is not None else None
    return curves, reference


def variant_groups(tables: Sequence[Table], utility: str, harm: str, n_boot: int) -> list[VariantGroup]:
    """Each table's variants and reference as (utility, harm) means, for the Pareto plot."""
    groups = []
    for table in tables:
        points = []
        for (selection, _), metrics in table.values.items():
            pair = _measured_pair(metrics, utility, harm, n_boot)
            if pair is not None:
                points.append((selection, pair[0].mean, pair[1].mean))
        pair = _measured_pair(table.reference, utility, harm, n_boot) if table.reference is not None else None
        reference = (pair[0].mean, pair[1].mean) if pair is not None else None
        groups.append(VariantGroup(table.title, points, reference))
    return groups


def mso_curves(summary: dict[str, dict[float, dict[str, Stat]]]) -> dict[str, dict[float, tuple[Estimate, Estimate]]]:
    """`mso_summary` as (MSO, baseline) estimates per pair and η, for the MSO plot."""
    return {
        label: {eta: (_estimate(stats["mso"]), _estimate(stats["baseline"])) for eta, stats in by_eta.items()}
        for label, by_eta in summary.items()
    }
