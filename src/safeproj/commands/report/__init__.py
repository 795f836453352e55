"""`safeproj report`: paper-style tables and plots from finished runs, with bootstrap CIs over seeds.

Inputs are run folders (every `summary.json` below them, as `RunSummary` writes it) or a sweep's
`index.jsonl`. Runs are grouped into cells (the sweep's cell label, else the resolved config minus
seed and paths); each number in a table is the mean over a cell's seeds with a seeded percentile
bootstrap 95 % interval (n = 1: no interval). A metric a run does not have is shown as "—" and never
filled in.

Tables: utility and harm against rank fraction per selection, from post hoc projection rows and
from online-projection cells; one line per cell with its final metrics; MSO against η when overlap
outputs (`mso.json`) are found; activation changes when `activations/analysis.json` is found.
Plots: utility-vs-harm curves per table, a Pareto plot of every projected variant, MSO curves.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from safeproj import plots
from safeproj.commands.sweep import DEFAULT_SEED_KEYS
from safeproj.runs import SUMMARY_FILE, metric_name
from safeproj.eval.stats import bootstrap_ci
from safeproj.io import write_csv, write_json, write_text

MISSING = "—"
SELECTION_ORDER = ("full", "top", "random-k", "random")
UTILITY_METRIC = "utility/flexible_acc"
HARM_METRIC = "harm/mean_score"
# Keys of a run's config that differ between seeds or machines, not between cells.
VOLATILE_CONFIG = (
    ("seed_everything",),
    ("ckpt_path",),
    ("config",),
    ("trainer", "default_root_dir"),
    ("model", "checkpoint_dir"),
)
VOLATILE_LOGGER_ARGS = ("save_dir", "name", "version", "tags", "group", "id", "dir", "experiment")
ROW_META = ("variant", "selection", "frac", "keep", "energy_kept")


# ---------------------------------------------------------------------------------------------
# Statistics


@dataclass
class Stat:
    """Mean over the values a cell has, its 95 % bootstrap interval, and how many of `total` had one."""

    mean: float
    low: float
    high: float
    n: int
    total: int

    def cell(self, digits: int = 3) -> str:
        if self.n == 0:
            return MISSING
        count = f"n={self.n}" if self.n == self.total else f"n={self.n}/{self.total}"
        if self.n == 1:
            return f"{self.mean:.{digits}f} ({count}, CI n/a)"
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}] {count}"

    def as_dict(self, prefix: str) -> dict[str, Any]:
        return {prefix: _none(self.mean), f"{prefix}_ci_low": _none(self.low), f"{prefix}_ci_high": _none(self.high),
                f"{prefix}_n": self.n}


def _none(value: float) -> float | None:
    return value if math.isfinite(value) else None


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


# ---------------------------------------------------------------------------------------------
# Reading runs


@dataclass
class Run:
    dir: Path
    source: str  # the input folder or index it was found through (named in errors)
    summary: dict[str, Any]
    cell: str = ""
    key: str = ""
    seed: int | None = None
    recipe: str = "?"
    metrics: dict[str, float | None] = field(default_factory=dict)
    posthoc: list[dict[str, Any]] = field(default_factory=list)
    seed_keys: list[str] = field(default_factory=list)

    @property
    def config(self) -> dict[str, Any]:
        return self.summary.get("config") or {}


@dataclass
class MsoResult:
    label: str
    seed: int | None
    dir: Path
    rows: list[dict[str, Any]]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: unreadable JSON ({' '.join(str(err).split())})") from None


def _summary_files(path: Path) -> list[Path]:
    if path.is_file() and path.suffix == ".jsonl":
        files = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise ValueError(f"{path}:{number}: not a JSON line") from None
            if record.get("kind", "run") == "run" and "dir" in record:
                files.append(path.parent / record["dir"] / SUMMARY_FILE)
        return [f for f in files if f.is_file()]
    if path.is_file() and path.name == SUMMARY_FILE:
        return [path]
    if path.is_dir():
        return sorted(path.rglob(SUMMARY_FILE))
    raise ValueError(f"{path}: expected a run folder, a {SUMMARY_FILE} or an index.jsonl")


def load_runs(paths: Sequence[str | os.PathLike]) -> list[Run]:
    """Every finished run under `paths`, once each.

    Raises:
        ValueError: no paths, a path that does not exist, or one that holds neither a finished run's
            summary.json nor overlap outputs (named).
    """
    if not paths:
        raise ValueError("runs is empty: give at least one run folder or index.jsonl")
    runs: dict[Path, Run] = {}
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise ValueError(f"{path}: no such file or folder")
        found = 0
        for file in _summary_files(path):
            summary = _read_json(file)
            if not isinstance(summary, dict) or summary.get("status") != "done":
                continue
            found += 1
            runs.setdefault(file.parent.resolve(), _make_run(file.parent, path, summary))
        if not found and not (path.is_dir() and any(path.rglob("mso.json"))):
            raise ValueError(f"{path}: no {SUMMARY_FILE} of a finished run (and no overlap output) in this folder")
    return list(runs.values())


def _make_run(directory: Path, source: Path, summary: dict[str, Any]) -> Run:
    run = Run(dir=directory, source=str(source), summary=summary)
    labels = summary.get("labels") or {}
    config = run.config
    logger_args = ((config.get("trainer") or {}).get("logger") or {})
    logger_args = logger_args.get("init_args") or {} if isinstance(logger_args, dict) else {}
    run.recipe = str(labels.get("recipe") or logger_args.get("group") or "?")
    seed = labels.get("seed", config.get("seed_everything"))
    run.seed = seed if isinstance(seed, int) and not isinstance(seed, bool) else None
    run.metrics = {}
    for key, value in (summary.get("metrics") or {}).items():
        name = metric_name(key) or key
        run.metrics[name] = _number(value)
    run.posthoc = [normalize_row(row) for row in summary.get("posthoc") or []]
    # Runs from outside a sweep take its default: seed_everything and data.seed vary with the seed.
    run.seed_keys = [k for k in str(labels.get("seed_keys") or ",".join(DEFAULT_SEED_KEYS)).split(",") if k]
    # The recipe is part of a cell's identity even where two recipes resolve to the same config.
    identity = {"recipe": run.recipe, "config": cell_config(config, run.seed_keys)}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:8]
    run.key = digest if config else f"dir:{directory}"
    if labels.get("cell"):
        run.cell = str(labels["cell"])
    elif config:
        run.cell = f"{run.recipe}-{digest}"
    else:
        root = source if source.is_dir() else source.parent
        run.cell = os.path.relpath(directory, root) if directory != root else directory.name
    return run


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(float(value)) else None


def normalize_row(row: dict[str, Any]) -> dict[str, Any]:
    """A post hoc row with its evaluator results under `utility/` and `harm/` names."""
    out = {k: row.get(k) for k in ROW_META}
    for key, value in row.items():
        name = metric_name(key)
        if name is not None:
            out[name] = _number(value)
    return out


def cell_config(config: dict[str, Any], seed_keys: Sequence[str] = ()) -> dict[str, Any]:
    """The config minus what differs between seeds of one cell (seed, paths, run names, labels)."""
    config = json.loads(json.dumps(config, default=str))
    for path in (*VOLATILE_CONFIG, *(tuple(k.split(".")) for k in seed_keys)):
        node = config
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(path[-1], None)
    trainer = config.get("trainer") or {}
    logger = trainer.get("logger")
    if isinstance(logger, dict) and isinstance(logger.get("init_args"), dict):
        for key in VOLATILE_LOGGER_ARGS:
            logger["init_args"].pop(key, None)
    if isinstance(trainer.get("callbacks"), list):
        trainer["callbacks"] = [
            cb for cb in trainer["callbacks"]
            if not (isinstance(cb, dict) and str(cb.get("class_path", "")).endswith("RunSummary"))
        ]
    return config


def group_cells(runs: Sequence[Run]) -> dict[str, list[Run]]:
    """Runs by cell label, in first-seen order; a label whose runs have different configs is an error."""
    cells: dict[str, list[Run]] = {}
    for run in runs:
        cells.setdefault(run.cell, []).append(run)
    for label, members in cells.items():
        keys = {r.key for r in members}
        if len(keys) > 1:
            first = members[0]
            other = next(r for r in members if r.key != first.key)
            recipes = sorted({r.recipe for r in members})
            what = f"recipes {', '.join(recipes)}" if len(recipes) > 1 else "different configs"
            raise ValueError(
                f"{other.source}: cell {label!r} mixes runs with {what} ({first.dir} and {other.dir}); "
                "report them from separate folders"
            )
    return cells


def load_mso(paths: Sequence[str | os.PathLike]) -> list[MsoResult]:
    """Overlap outputs (`mso.json`, with the sweep's `after.json` beside it when there is one)."""
    results, seen = [], set()
    for raw in paths:
        path = Path(raw)
        root = path.parent if path.is_file() else path
        for file in sorted(root.rglob("mso.json")) if root.is_dir() else []:
            if file.resolve() in seen:
                continue
            seen.add(file.resolve())
            rows = _read_json(file)
            if not isinstance(rows, list):
                raise ValueError(f"{file}: expected a list of MSO rows")
            after = file.parent / "after.json"
            meta = _read_json(after) if after.is_file() else {}
            seed = meta.get("seed")
            if seed is None:
                match = re.fullmatch(r"seed(\d+)", file.parent.name)
                seed = int(match.group(1)) if match else None
            label = meta.get("name") or (file.parent.parent.name if seed is not None else file.parent.name)
            results.append(MsoResult(label=str(label), seed=seed, dir=file.parent, rows=rows))
    return results


# ---------------------------------------------------------------------------------------------
# Tables


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


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "table"


def _callback(config: dict[str, Any], name: str) -> dict[str, Any] | None:
    for cb in (config.get("trainer") or {}).get("callbacks") or []:
        if isinstance(cb, dict) and str(cb.get("class_path", "")).rsplit(".", 1)[-1] == name:
            return cb.get("init_args") or {}
    return None


def _metric_lists(runs: Sequence[Run], getter) -> dict[str, list[float | None]]:
    names = sorted({k for r in runs for k in getter(r) if k.startswith(("utility/", "harm/"))})
    return {name: [getter(r).get(name) for r in runs] for name in names}


def _variant(run: Run, point: tuple[str, float] | None) -> dict[str, Any]:
    """A run's post hoc row at (selection, frac), or its "full" row for None; {} when it has none."""
    for row in run.posthoc:
        if point is None and row.get("variant") == "full":
            return row
        if point is not None and row.get("variant") != "full" and row.get("frac") is not None \
                and (row.get("selection"), float(row["frac"])) == point:
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
        points = sorted({(row["selection"], float(row["frac"])) for row in rows
                         if row.get("variant") != "full" and row.get("frac") is not None})
        values = {
            point: {**_metric_lists(runs, lambda r, p=point: _variant(r, p)),
                    "energy_kept": [_variant(r, point).get("energy_kept") for r in runs]}
            for point in points
        }
        has_full = any(row.get("variant") == "full" for row in rows)
        reference = _metric_lists(runs, lambda r: _variant(r, None)) if has_full else None
        keep = "/".join(keeps) or "parallel"
        tables.append(Table(title=f"{label}: post hoc ({keep})", slug=_slug(f"posthoc_{label}"), kind="posthoc",
                            values=values, reference=reference, reference_label="full fine-tuning (no projection)"))
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
        plain = [(label, runs) for label, runs in cells.items()
                 if runs[0].recipe == recipe and _callback(runs[0].config, "OnlineProjection") is None]
        if len(plain) > 1:
            # Several unprojected cells of the recipe: take the one from the same sweep (label prefix).
            scope = members[0][0].rpartition("/")[0]
            plain = [(label, runs) for label, runs in plain if label.rpartition("/")[0] == scope]
        if len(plain) == 1:
            reference_label = f"no projection (cell {plain[0][0]})"
            reference = _metric_lists(plain[0][1], lambda r: r.metrics)
        tables.append(Table(title=f"{name}: online projection ({keep}, recipe {recipe})", slug=_slug(f"online_{name}"),
                            kind="online", values=values, reference=reference, reference_label=reference_label,
                            x_label=x_label))
    return tables


def _family_name(labels: Sequence[str]) -> str:
    """The cell labels' shared stem, without the grid's frac/eta/selection parts."""
    stems = {re.split(r"-(?:frac|eta|selection)=", label)[0] for label in labels}
    return stems.pop() if len(stems) == 1 else os.path.commonprefix(sorted(stems)).rstrip("-/") or "online"


def _selections(table: Table) -> list[str]:
    found = {s for s, _ in table.values}
    return [s for s in SELECTION_ORDER if s in found] + sorted(found - set(SELECTION_ORDER))


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def table_markdown(table: Table, metric: str, n_boot: int) -> list[str]:
    xs = sorted({x for _, x in table.values})
    rows = []
    for selection in _selections(table):
        cells = []
        for x in xs:
            values = table.values.get((selection, x))
            cells.append(summarize(values[metric], n_boot).cell() if values and metric in values else MISSING)
        rows.append([selection, *cells])
    lines = [f"**{metric}**", "", *markdown_table([f"selection \\ {table.x_label}", *[f"{x:g}" for x in xs]], rows)]
    if table.reference is not None:
        ref = summarize(table.reference[metric], n_boot).cell() if metric in table.reference else MISSING
        lines += ["", f"{table.reference_label}: {ref}"]
    return lines + [""]


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
    return {label: {eta: {k: summarize(v, n_boot) for k, v in stats.items()} for eta, stats in sorted(etas.items())}
            for label, etas in per_seed.items()}


def activation_rows(cells: dict[str, list[Run]], n_boot: int) -> list[list[str]]:
    rows = []
    for label, runs in cells.items():
        found = [r.dir / "activations" / "analysis.json" for r in runs]
        analyses = [_read_json(f) for f in found if f.is_file()]
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


# ---------------------------------------------------------------------------------------------
# Plots


def _point(metrics: dict[str, list], name: str, n_boot: int) -> Stat:
    return summarize(metrics.get(name, []), n_boot)


def plot_tradeoff(table: Table, utility: str, harm: str, path: Path, n_boot: int) -> Path | None:
    """Utility (x) against harm (y), one line per selection through its fracs, with 95 % CIs."""
    fig = plots.new_figure()
    ax = fig.add_subplot()
    drawn = 0
    for i, selection in enumerate(_selections(table)):
        points = []
        for (s, x), metrics in sorted(table.values.items(), key=lambda kv: kv[0][1]):
            u, h = _point(metrics, utility, n_boot), _point(metrics, harm, n_boot)
            if s == selection and u.n and h.n:
                points.append((x, u, h))
        if not points:
            continue
        drawn += 1
        xs, ys = [p[1].mean for p in points], [p[2].mean for p in points]
        ax.errorbar(xs, ys, xerr=_err([p[1] for p in points]), yerr=_err([p[2] for p in points]), marker="o",
                    markersize=4, capsize=2, linewidth=1.3, color=f"C{i}", label=selection)
        for x, u, h in points:
            ax.annotate(f"{x:g}", (u.mean, h.mean), textcoords="offset points", xytext=(3, 3), fontsize=6)
    if table.reference is not None:
        u, h = _point(table.reference, utility, n_boot), _point(table.reference, harm, n_boot)
        if u.n and h.n:
            ax.errorbar([u.mean], [h.mean], xerr=_err([u]), yerr=_err([h]), marker="*", markersize=11, color="black",
                        linestyle="none", label=table.reference_label)
            drawn += 1
    if not drawn:
        return None
    ax.set_title(table.title, fontsize=9)
    ax.set_xlabel(f"{utility} (higher is better)")
    ax.set_ylabel(f"{harm} (lower is better)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return plots.save_png(fig, path)


def _err(stats: Sequence[Stat]) -> np.ndarray | None:
    if not any(s.n > 1 for s in stats):
        return None
    low = [s.mean - s.low if s.n > 1 else 0.0 for s in stats]
    high = [s.high - s.mean if s.n > 1 else 0.0 for s in stats]
    return np.array([low, high])


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of points no other point beats on both utility (higher) and harm (lower), by utility."""
    front = []
    for i, (u, h) in enumerate(points):
        dominated = any((u2 >= u and h2 <= h) and (u2 > u or h2 < h) for j, (u2, h2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def plot_pareto(tables: Sequence[Table], utility: str, harm: str, path: Path, n_boot: int) -> Path | None:
    """Every projected variant and reference as a point; the Pareto front (max utility, min harm) drawn."""
    points, labels = [], []
    fig = plots.new_figure(7.2, 5.0)
    ax = fig.add_subplot()
    markers = {"top": "o", "random-k": "s", "random": "^", "full": "*"}
    for i, table in enumerate(tables):
        for (selection, x), metrics in table.values.items():
            u, h = _point(metrics, utility, n_boot), _point(metrics, harm, n_boot)
            if u.n and h.n:
                ax.scatter([u.mean], [h.mean], marker=markers.get(selection, "D"), color=f"C{i % 10}", s=22, alpha=0.85)
                points.append((u.mean, h.mean))
                labels.append(f"{table.title} {selection}@{x:g}")
        if table.reference is not None:
            u, h = _point(table.reference, utility, n_boot), _point(table.reference, harm, n_boot)
            if u.n and h.n:
                ax.scatter([u.mean], [h.mean], marker="*", color=f"C{i % 10}", s=90, edgecolors="black")
                points.append((u.mean, h.mean))
                labels.append(f"{table.title} {table.reference_label}")
    if not points:
        return None
    front = pareto_front(points)
    ax.plot([points[i][0] for i in front], [points[i][1] for i in front], color="black", linewidth=1.2,
            linestyle="--", label="Pareto front")
    for i, table in enumerate(tables):
        ax.scatter([], [], color=f"C{i % 10}", label=table.title[:60])
    for selection, marker in markers.items():
        ax.scatter([], [], color="gray", marker=marker, label=selection)
    ax.set_xlabel(f"{utility} (higher is better)")
    ax.set_ylabel(f"{harm} (lower is better)")
    ax.set_title("Utility vs harm of every variant")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="x-small")
    return plots.save_png(fig, path)


def plot_mso(summary: dict[str, dict[float, dict[str, Stat]]], path: Path) -> Path | None:
    if not summary:
        return None
    fig = plots.new_figure()
    ax = fig.add_subplot()
    for i, (label, etas) in enumerate(summary.items()):
        xs = list(etas)
        mso = [etas[e]["mso"] for e in xs]
        base = [etas[e]["baseline"] for e in xs]
        ax.plot(xs, [s.mean for s in mso], marker="o", markersize=3, color=f"C{i}", label=label)
        if any(s.n > 1 for s in mso):
            low = [s.low if s.n > 1 else s.mean for s in mso]
            high = [s.high if s.n > 1 else s.mean for s in mso]
            ax.fill_between(xs, low, high, color=f"C{i}", alpha=0.2)
        ax.plot(xs, [s.mean for s in base], linestyle="--", color=f"C{i}", linewidth=1, alpha=0.8)
    ax.plot([], [], linestyle="--", color="gray", label="random baseline (dashed)")
    ax.set_xlabel("energy share η")
    ax.set_ylabel("MSO (model mean)")
    ax.set_ylim(0.0, 1.02)
    ax.set_title("Mode Subspace Overlap (mean and 95 % CI over seeds)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return plots.save_png(fig, path)


# ---------------------------------------------------------------------------------------------
# Compare


def select_runs(selector: str, runs: Sequence[Run]) -> list[Run]:
    """Runs under a folder (when `selector` is one) or whose cell label matches a glob pattern."""
    path = Path(selector)
    if path.exists():
        root = path.resolve()
        chosen = [r for r in runs if r.dir.resolve() == root or root in r.dir.resolve().parents]
    else:
        chosen = [r for r in runs if fnmatch.fnmatchcase(r.cell, selector) or r.cell == selector]
    if not chosen:
        cells = sorted({r.cell for r in runs})
        raise ValueError(f"compare {selector!r} matches no run; cells are {', '.join(cells[:12])}")
    return chosen


def compare_lines(selectors: Sequence[str], runs: Sequence[Run], n_boot: int) -> list[str]:
    if len(selectors) != 2:
        raise ValueError(f"compare takes two runs or groups (a folder or a cell pattern each), got {len(selectors)}")
    a, b = (select_runs(s, runs) for s in selectors)
    names = sorted({k for r in (*a, *b) for k, v in r.metrics.items()
                    if not k.endswith(("_ci_low", "_ci_high")) and not k.endswith("/n")})
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


# ---------------------------------------------------------------------------------------------
# Writing


def log_wandb(out_dir: Path, rows: Sequence[dict[str, Any]], images: Sequence[Path]) -> str | None:
    """The report's rows as a W&B table and its plots as images, in an offline run unless WANDB_MODE=online."""
    from safeproj.wandb import wandb_mode

    mode = wandb_mode()
    if mode == "disabled" or not rows:
        return None
    import wandb

    run = wandb.init(project="safeproj", dir=str(out_dir), mode="online" if mode == "online" else "offline",
                     job_type="report", name=f"report-{out_dir.name}", reinit="finish_previous")
    try:
        columns = list(dict.fromkeys(k for row in rows for k in row))
        table = wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])
        run.log({"report/rows": table, **{f"report/{p.stem}": wandb.Image(str(p)) for p in images}})
        return run.dir
    finally:
        run.finish()


def report_command(
    runs: list[str] | str,
    out_dir: str = "runs/report",
    compare: list[str] | None = None,
    n_boot: int = 1000,
    utility_metric: str = UTILITY_METRIC,
    harm_metric: str = HARM_METRIC,
) -> dict[str, str]:
    """Tables and plots of finished runs, mean and 95 % bootstrap CI over seeds.

    Writes report.md (markdown tables), report.json and report.csv (every number with its interval),
    utility-vs-harm and Pareto plots, and MSO curves when overlap outputs are found; logs a W&B table
    unless WANDB_MODE=disabled.

    Args:
        runs: run folders (searched for summary.json), summary.json files or a sweep's index.jsonl;
            one path, or a list (`'[runs/a, runs/b]'` on the command line).
        out_dir: where the report goes.
        compare: two runs or groups side by side: each a folder or a cell-label glob pattern.
        n_boot: bootstrap resamples per interval.
        utility_metric: the utility number of tables and plots.
        harm_metric: the harm number of tables and plots (lower is better).

    Returns:
        The written files by kind.
    """
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"n_boot must be an integer >= 1, got {n_boot!r}")
    runs = [runs] if isinstance(runs, (str, os.PathLike)) else list(runs)
    found = load_runs(runs)
    cells = group_cells(found)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables = posthoc_tables(cells) + online_tables(cells)
    written: dict[str, str] = {}
    images: list[Path] = []
    lines = ["# safeproj report", "",
             f"{len(found)} runs in {len(cells)} cells from {', '.join(str(r) for r in runs)}. "
             f"Numbers: mean over seeds, [95 % percentile-bootstrap CI] ({n_boot} resamples), n = runs with the "
             f"metric; {MISSING} = not measured in these runs.", ""]

    lines += ["## Cells", ""]
    metrics = [utility_metric, harm_metric]
    lines += markdown_table(["cell", "recipe", "seeds", *metrics], overview_rows(cells, metrics, n_boot)) + [""]

    rows: list[dict[str, Any]] = []
    for table in tables:
        lines += [f"## {table.title}", ""]
        for metric in metrics:
            lines += table_markdown(table, metric, n_boot)
        plot = plot_tradeoff(table, utility_metric, harm_metric, out / f"tradeoff_{table.slug}.png", n_boot)
        if plot is not None:
            images.append(plot)
            written[f"tradeoff_{table.slug}"] = str(plot)
            lines += [f"![utility vs harm]({plot.name})", ""]
        else:
            lines += [f"No utility-vs-harm plot: {utility_metric} or {harm_metric} is missing.", ""]
        rows += table_rows(table, n_boot)
    if tables:
        pareto = plot_pareto(tables, utility_metric, harm_metric, out / "pareto.png", n_boot)
        if pareto is not None:
            images.append(pareto)
            written["pareto"] = str(pareto)
            lines += ["## Pareto plot", "", f"![Pareto]({pareto.name})", ""]

    mso = mso_summary(load_mso(runs), n_boot)
    if mso:
        etas = sorted({eta for pair in mso.values() for eta in pair})
        mso_rows = []
        for label, by_eta in mso.items():
            mso_rows.append([label, *(by_eta[e]["mso"].cell() if e in by_eta else MISSING for e in etas)])
            mso_rows.append([f"{label} (random baseline)",
                             *(by_eta[e]["baseline"].cell() if e in by_eta else MISSING for e in etas)])
            for eta, stats in by_eta.items():
                rows.append({"table": "mso", "kind": "mso", "pair": label, "eta": eta,
                             **stats["mso"].as_dict("mso"), **stats["baseline"].as_dict("baseline")})
        lines += ["## Mode Subspace Overlap (model mean)", "",
                  *markdown_table(["pair \\ η", *[f"{e:g}" for e in etas]], mso_rows), ""]
        plot = plot_mso(mso, out / "mso_vs_eta.png")
        if plot is not None:
            images.append(plot)
            written["mso_vs_eta"] = str(plot)
            lines += [f"![MSO]({plot.name})", ""]

    activations = activation_rows(cells, n_boot)
    if activations:
        lines += ["## Activations: first vs last recorded step", "",
                  *markdown_table(["cell", "layer", "metric", "first", "last", "change"], activations), ""]

    if compare:
        lines += compare_lines(compare, found, n_boot)

    written["markdown"] = str(write_text(out / "report.md", "\n".join(lines) + "\n"))
    written["json"] = str(write_json(out / "report.json", rows, allow_nan=False))
    if rows:
        written["csv"] = str(write_csv(out / "report.csv", rows))
    wandb_dir = log_wandb(out, rows, images)
    if wandb_dir:
        written["wandb"] = wandb_dir
    print(f"report of {len(found)} runs in {len(cells)} cells -> {written['markdown']}")
    return written
