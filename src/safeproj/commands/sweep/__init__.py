"""`safeproj sweep`: run a grid of recipe variants × seeds, one subprocess per run, resumable.

The spec format (cells, grids, callback overrides, includes, after-steps) is described in docs/sweeps.md;
spec.py reads and checks a spec, config.py writes each run's config, runner.py runs them; plan.py checks
every cell without running anything and estimates its cost (estimate.py).
"""

from __future__ import annotations

from typing import Any

from safeproj.commands.sweep.plan import PREREQUISITE, plan_sweep
from safeproj.commands.sweep.runner import run_sweep


def sweep_command(
    spec: str,
    out_dir: str | None = None,
    seeds: list[int] | None = None,
    dry_run: bool = False,
    max_runs: int | None = None,
    plan: bool = False,
    gpu: str = "a100-80gb",
) -> dict[str, Any]:
    """Run a sweep spec: every cell × seed in its own folder, skipping runs already done.

    Run the same command again after a crash or a kill: finished runs are skipped, unfinished ones
    start over.

    Args:
        spec: a sweep spec YAML (see recipes/sweeps/).
        out_dir: where run folders go; default `runs/sweeps/<spec name>`.
        seeds: seeds to run instead of the spec's.
        dry_run: print what would run, run nothing, write nothing.
        max_runs: stop after starting this many runs (after-steps still run for what is done).
        plan: check every cell's full config without downloading, running or writing anything, and print
            cells, runs, training and generated tokens per run and estimated GPU-hours on `gpu`.
        gpu: the GPU class of the plan's estimate: a100-40gb, a100-80gb, h100-80gb or h200.

    Returns:
        Counts of runs: total, skipped (already done), ran, failed; with `plan`, cells, runs and GPU-hours.
    """
    if plan:
        rows = plan_sweep(spec, out_dir, seeds, gpu)[0]
        cells = [row for row in rows if not row.name.startswith(PREREQUISITE)]
        hours = sum((row.gpu_hours_per_run or 0.0) * row.runs for row in rows)
        return {"cells": len(cells), "runs": sum(row.runs for row in cells), "gpu": gpu, "gpu_hours": hours}
    result = run_sweep(spec, out_dir, seeds, dry_run, max_runs)
    if result.failed:
        raise SystemExit(
            f"safeproj sweep: {len(result.failed)} failed ({', '.join(result.failed[:3])}"
            f"{', …' if len(result.failed) > 3 else ''}); fix and run the same command again to finish"
        )
    return {
        "out_dir": str(result.out_dir),
        "total": result.total,
        "skipped": result.skipped,
        "ran": len(result.ran),
        "failed": len(result.failed),
    }
