"""`safeproj report`: paper-style tables and plots from finished runs, with bootstrap CIs over seeds.

load.py reads runs and groups them into cells, stats.py gives each number its interval, tables.py builds
the tables and the series of the figures (drawn by safeproj.plots.report); what a report contains is
described in docs/sweeps.md.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safeproj.commands.report.effects import cell_effects, effects_section
from safeproj.commands.report.load import Run, group_cells, load_mso, load_runs
from safeproj.commands.report.stats import MISSING
from safeproj.commands.report.tables import (
    activation_rows,
    compare_lines,
    markdown_table,
    metric_legend,
    mso_curves,
    mso_markdown,
    mso_rows,
    mso_summary,
    online_tables,
    overview_rows,
    posthoc_tables,
    slug_of,
    table_markdown,
    table_rows,
    tradeoff_curves,
    variant_groups,
)
from safeproj.io import write_csv, write_json, write_text
from safeproj.plots.report import Estimate, plot_mso, plot_pareto, plot_retention_energy, plot_tradeoff

# The first of each that the runs measured is reported, unless a metric is named: the continuous
# likelihood metrics where present, the generation-based ones otherwise.
UTILITY_METRICS = ("utility/answer_nll", "utility/flexible_acc")
HARM_METRICS = ("harm/comply_margin", "harm/mean_score")
LOWER_IS_BETTER = frozenset({"utility/answer_nll"})


def pick_metric(runs: Sequence[Run], preference: Sequence[str]) -> str:
    """The first metric of `preference` that any run measured (final metrics or post hoc rows)."""
    present = {k for r in runs for k in r.metrics} | {k for r in runs for row in r.posthoc for k in row}
    return next((m for m in preference if m in present), preference[-1])


def log_wandb(out_dir: Path, rows: Sequence[dict[str, Any]], images: Sequence[Path]) -> str | None:
    """The report's rows as a W&B table and its plots as images, in a `job_type=report` run in `out_dir`."""
    from safeproj.wandb import command_run, log_images, log_table

    if not rows:
        return None
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with command_run("report", out_dir, config={"report": str(out_dir)}) as loggers:
        if not loggers:
            return None
        log_table(loggers, "report/rows", [{c: row.get(c) for c in columns} for row in rows])
        for image in images:
            log_images(loggers, f"report/{Path(image).stem}", [str(image)])
        return loggers[0].experiment.dir


def report_command(
    runs: list[str] | str,
    out_dir: str = "runs/report",
    compare: list[str] | None = None,
    n_boot: int = 1000,
    utility_metric: str | None = None,
    harm_metric: str | None = None,
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
        utility_metric: the utility number of tables and plots (default: utility/answer_nll where
            measured, else utility/flexible_acc).
        harm_metric: the harm number of tables and plots, lower is better (default: harm/comply_margin
            where measured, else harm/mean_score, the refusal-phrase keyword proxy).

    Returns:
        The written files by kind.
    """
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"n_boot must be an integer >= 1, got {n_boot!r}")
    runs = [runs] if isinstance(runs, (str, os.PathLike)) else list(runs)
    found = load_runs(runs)
    utility_metric = utility_metric or pick_metric(found, UTILITY_METRICS)
    harm_metric = harm_metric or pick_metric(found, HARM_METRICS)
    cells = group_cells(found)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables = posthoc_tables(cells) + online_tables(cells)
    written: dict[str, str] = {}
    images: list[Path] = []
    lines = [
        "# safeproj report",
        "",
        f"{len(found)} runs in {len(cells)} cells from {', '.join(str(r) for r in runs)}. "
        f"Numbers: mean over seeds, [95 % percentile-bootstrap CI] ({n_boot} resamples), n = runs with the "
        f"metric; {MISSING} = not measured in these runs.",
        "",
    ]

    metrics = [utility_metric, harm_metric]
    lines += ["## Metrics", "", *metric_legend(found, metrics), ""]
    lines += ["## Cells", ""]
    lines += [*markdown_table(["cell", "recipe", "seeds", *metrics], overview_rows(cells, metrics, n_boot)), ""]

    rows: list[dict[str, Any]] = []
    for table in tables:
        lines += [f"## {table.title}", ""]
        for metric in metrics:
            lines += table_markdown(table, metric, n_boot)
        curves, reference = tradeoff_curves(table, utility_metric, harm_metric, n_boot)
        plot = plot_tradeoff(
            curves,
            out / f"tradeoff_{table.slug}.png",
            title=table.title,
            utility=utility_metric,
            harm=harm_metric,
            reference=reference,
        )
        if plot is not None:
            images.append(plot)
            written[f"tradeoff_{table.slug}"] = str(plot)
            lines += [f"![utility vs harm]({plot.name})", ""]
        else:
            lines += [f"No utility-vs-harm plot: {utility_metric} or {harm_metric} is missing.", ""]
        rows += table_rows(table, n_boot)
    if tables:
        groups = variant_groups(tables, utility_metric, harm_metric, n_boot)
        pareto = plot_pareto(
            groups,
            out / "pareto.png",
            utility=utility_metric,
            harm=harm_metric,
            utility_lower_is_better=utility_metric in LOWER_IS_BETTER,
        )
        if pareto is not None:
            images.append(pareto)
            written["pareto"] = str(pareto)
            lines += ["## Pareto plot", "", f"![Pareto]({pareto.name})", ""]

    effects = cell_effects(cells, utility_metric, harm_metric, n_boot)
    if effects:
        section, effect_rows, series = effects_section(effects, n_boot)
        lines += section
        rows += effect_rows
        for label, curves in series.items():
            estimates = {
                name: [(x, Estimate(m.effect.estimate, m.effect.low, m.effect.high)) for x, m in points]
                for name, points in curves.items()
            }
            slug = slug_of(f"retention_energy_{label}")
            plot = plot_retention_energy(estimates, out / f"{slug}.png", title=f"{label}: retention vs energy kept")
            if plot is not None:
                images.append(plot)
                written[slug] = str(plot)
                lines += [f"![retention vs energy kept]({plot.name})", ""]
    elif any(r.posthoc for r in found):
        lines += ["No effect sizes: no run has per-item values (`utility_items.json`, `harm_items.json`).", ""]

    mso = mso_summary(load_mso(runs), n_boot)
    if mso:
        rows += mso_rows(mso)
        lines += ["## Mode Subspace Overlap (model mean)", "", *mso_markdown(mso), ""]
        plot = plot_mso(mso_curves(mso), out / "mso_vs_eta.png")
        if plot is not None:
            images.append(plot)
            written["mso_vs_eta"] = str(plot)
            lines += [f"![MSO]({plot.name})", ""]

    activations = activation_rows(cells, n_boot)
    if activations:
        lines += [
            "## Activations: first vs last recorded step",
            "",
            *markdown_table(["cell", "layer", "metric", "first", "last", "change"], activations),
            "",
        ]

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
