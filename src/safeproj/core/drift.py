"""Subspace drift as tables: the share of a run's update inside a basis, per weight and pooled, over steps.

One measurement gives a row per weight (`share` = ‖PΔW‖²/‖ΔW‖², `random` = the share of a random
subspace of the same size, `energy` = ‖ΔW‖²) and the pooled row `overall`, whose share and random
baseline are weighted by energy (`core.energy.pool`). A history is the rows of many measurements.
"""

from __future__ import annotations

import math
from collections import defaultdict

from safeproj.core.basis import Basis
from safeproj.core.deltas import RunDelta
from safeproj.core.energy import energy_row, pool
from safeproj.core.names import layer_of, layer_sort_key
from safeproj.core.sharded import energy_of_rows, is_sharded, run_update_rows

OVERALL = "overall"
COLUMNS = ("step", "name", "layer", "share", "random", "energy")


def measure(run: RunDelta, basis: Basis, step: int) -> list[dict]:
    """One row per weight of the run plus the pooled `overall` row, as plain values.

    Weights sharded by rows (FSDP2) are measured on each process's rows, their squared norms summed over
    the processes (`core.sharded`): every process must call this together, and none gathers a weight.
    """
    rows, energies = [], []
    for name in run.names():
        energy = _energy(run, name, basis.entries[name])
        energies.append(energy)
        rows.append(_row(step, name, layer_of(name), energy["share"], energy["random_share"], energy["total"]))
    pooled = pool(energies)
    rows.append(_row(step, OVERALL, OVERALL, pooled["share"], pooled["random_share"], pooled["total"]))
    return rows


def _energy(run: RunDelta, name: str, entry) -> dict:
    t = run.targets[name]
    if not is_sharded(t.lora_b if t.is_lora else t.weight):
        return energy_row(run.update(name), entry)
    return energy_of_rows(*run_update_rows(run, name), entry)


def _row(step: int, name: str, layer: str, share: float, random: float, energy: float) -> dict:
    return dict(zip(COLUMNS, (step, name, layer, share, random, energy)))


def layer_means(rows: list[dict]) -> dict[str, float]:
    """Mean share per layer over the tensors of one measurement (NaN shares left out)."""
    groups: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        if row["name"] != OVERALL and not math.isnan(row["share"]):
            groups[row["layer"]].append(row["share"])
    return {layer: sum(v) / len(v) for layer, v in groups.items()}


def metrics(rows: list[dict]) -> dict[str, float]:
    """The scalars of one measurement: `drift/overall`, `drift/random` and `drift/<layer>` means."""
    overall = next(r for r in rows if r["name"] == OVERALL)
    out = {"drift/overall": overall["share"], "drift/random": overall["random"]}
    out.update({f"drift/{layer}": v for layer, v in layer_means(rows).items()})
    return out


def layer_step_grid(history: list[dict], max_steps: int) -> tuple[list[str], list[int], list[list[float]], float]:
    """(row labels, steps, values, random baseline) of a layer × step table of a history.

    Rows: layers in block order, each its weights' mean share, then the pooled `overall`. At most
    `max_steps` evenly spaced measurements are kept, always the last one; the baseline is the last
    measurement's pooled random share.
    """
    by_step: dict[int, list[dict]] = defaultdict(list)
    for row in history:
        by_step[row["step"]].append(row)
    steps = sorted(by_step)
    if len(steps) > max_steps:
        picks = {round(i * (len(steps) - 1) / (max_steps - 1)) for i in range(max_steps)}
        steps = [steps[i] for i in sorted(picks)]
    means = {step: layer_means(by_step[step]) for step in steps}
    overall = {step: next(r for r in by_step[step] if r["name"] == OVERALL) for step in steps}
    layers = sorted({layer for m in means.values() for layer in m}, key=layer_sort_key)
    values = [[means[s].get(layer, math.nan) for s in steps] for layer in layers]
    values.append([overall[s]["share"] for s in steps])
    return [*layers, OVERALL], steps, values, overall[steps[-1]]["random"]
