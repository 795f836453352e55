"""Post hoc projection: put W₀ + P·Δ_T into a trained model for each grid subspace, score it, restore.

Memory: one copy of the trained weights (on their device, in their dtype), which brings them back bit
for bit; W₀ comes tensor by tensor from the run's RunDelta (read from disk when the run's start is
there), and the subspaces tensor by tensor from a SubspaceGrid (from disk when it has a folder). So
beyond the trained copy, a few tensors of the largest shape are in use at any moment.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from safeproj.core.deltas import RunDelta
from safeproj.core.energy import SubspaceGrid, Variant, pool
from safeproj.core.factors import BasisEntry
from safeproj.core.options import KEEPS, check_choice
from safeproj.core.projector import project, project_left, project_right
from safeproj.core.sharded import (
    is_sharded,
    local_part,
    lora_update_rows,
    project_left_rows,
    project_right_rows,
    project_rows,
    row_shard,
    rows_of,
    squared_norms,
)
from safeproj.core.spectrum import squared_norm
from safeproj.io import write_rows


class WeightVariants:
    """Swaps W₀ + P·Δ_T into the model tensor by tensor and restores the trained weights afterwards.

    LoRA pairs are projected on their factors (P·B on the left, A·P on the right), which is W₀ + P·Δ_T
    for adapters that start at B₀ = 0. Weights sharded by rows (FSDP2's DTensors) are handled on each
    process's rows (`core.sharded`): every process must call `apply` and `restore` together, and none
    gathers a weight; the trained copy and W₀ are kept for the local rows only.
    """

    def __init__(self, run: RunDelta, keep: str):
        check_choice("keep", keep, KEEPS)
        self.run, self.keep = run, keep
        self.targets = list(run.targets.values())
        self.trained = {
            t.name: tuple(local_part(p).clone() for p in (t.lora_b, t.lora_a))
            if t.is_lora
            else local_part(t.weight).clone()
            for t in self.targets
        }

    @torch.no_grad()
    def apply(self, entry_of: Callable[[str], BasisEntry] | None) -> float:
        """Set every target to its projected variant (None = the trained weights); pooled share of energy kept."""
        rows = []
        for t in self.targets:
            entry = None if entry_of is None else entry_of(t.name)
            if t.is_lora:
                rows.append(self._apply_lora(t, entry))
            elif is_sharded(t.weight):
                rows.append(self._apply_rows(t, entry))
            else:
                rows.append(self._apply_weight(t, entry))
        return pool(rows)["share"]

    def _apply_weight(self, t, entry: BasisEntry | None) -> dict:
        start = self.run.start(t.name).to(t.weight.device).float()
        delta = self.trained[t.name].float() - start
        total = squared_norm(delta)
        if entry is None:
            self._restore(t)
            return {"kept": total, "total": total}
        projected = project(delta, entry, self.keep)
        t.weight.copy_(start + projected)
        return {"kept": squared_norm(projected), "total": total}

    def _apply_rows(self, t, entry: BasisEntry | None) -> dict:
        """This process's rows of W₀ + P·Δ_T for a row-sharded weight: sums over rows are all-reduced."""
        shard = row_shard(t.weight)
        start = rows_of(self.run.start(t.name), shard).to(shard.local.device).float()
        delta = self.trained[t.name].float() - start
        if entry is None:
            self._restore(t)
            (total,) = squared_norms([delta], shard.groups)
            return {"kept": total, "total": total}
        projected = project_rows(delta, shard.start, entry, self.keep, shard.sum_over_rows)
        shard.local.copy_(start + projected)
        kept, total = squared_norms([projected, delta], shard.groups)
        return {"kept": kept, "total": total}

    def _apply_lora(self, t, entry: BasisEntry | None) -> dict:
        self._restore(t)
        total = self._lora_energy(t)
        if entry is None:
            return {"kept": total, "total": total}
        if self.keep == "orthogonal" and entry.left is not None and entry.right is not None:
            raise ValueError("keep='orthogonal' with side='both' cannot be applied to LoRA factors")
        b, a = self.trained[t.name]
        if entry.left is not None:
            local_part(t.lora_b).copy_(self._project_b(t, b, entry.left))
        if entry.right is not None:  # A·P acts on each row alone, sharded or not
            local_part(t.lora_a).copy_(
                project_right_rows(a, entry.right, self.keep)
                if is_sharded(t.lora_a)
                else project_right(a, entry.right, self.keep)
            )
        return {"kept": self._lora_energy(t), "total": total}

    def _project_b(self, t, b: Tensor, factor) -> Tensor:
        if not is_sharded(t.lora_b):
            return project_left(b, factor, self.keep)
        shard = row_shard(t.lora_b)
        return project_left_rows(b, shard.start, factor, self.keep, shard.sum_over_rows)

    @staticmethod
    def _lora_energy(t) -> float:
        """‖s·B·A‖² of the pair in the model; the rows of a sharded B are summed over the processes."""
        if not is_sharded(t.lora_b):
            return squared_norm(t.delta_weight())
        rows, shard = lora_update_rows(t.lora_b, t.lora_a, t.scaling)
        return squared_norms([rows], shard.groups)[0]

    def restore(self) -> None:
        for t in self.targets:
            self._restore(t)

    @torch.no_grad()
    def _restore(self, t) -> None:
        if t.is_lora:
            b, a = self.trained[t.name]
            local_part(t.lora_b).copy_(b)
            local_part(t.lora_a).copy_(a)
        else:
            local_part(t.weight).copy_(self.trained[t.name])


def run_variants(
    module,
    run: RunDelta,
    grid: SubspaceGrid,
    variants: Sequence[Variant],
    keep: str,
    evaluators: Sequence[object],
    include_full: bool = True,
) -> Iterator[dict]:
    """Yields one row per variant: its settings, the pooled energy share kept, and every evaluator's metrics.

    An evaluator has `evaluate(module) -> dict`; its metrics are prefixed with its `prefix` ("utility/...").
    The trained weights are back in place when the generator ends, also after an error.
    """
    swap = WeightVariants(run, keep)

    def entry_of(variant: Variant) -> Callable[[str], BasisEntry]:
        def entry(name: str) -> BasisEntry:
            kept = grid.entry(name, variant)
            if grid.on_disk:
                grid.release(name)
            return kept

        return entry

    plan: list[Variant | None] = ([None] if include_full else []) + list(variants)
    try:
        for variant in tqdm(plan, desc="post hoc variants"):
            share = swap.apply(None if variant is None else entry_of(variant))
            row = {
                "variant": "full" if variant is None else variant.name,
                "selection": "full" if variant is None else variant.selection,
                "frac": 1.0 if variant is None else variant.frac,
                "keep": "none" if variant is None else keep,
                "energy_kept": share,
            }
            for evaluator in evaluators:
                prefix = (getattr(evaluator, "prefix", "") or type(evaluator).__name__).rstrip("/")
                row.update({f"{prefix}/{k}": v for k, v in evaluator.evaluate(module).items()})
            yield row
    finally:
        swap.restore()


def score_variants(
    module,
    run: RunDelta,
    source,
    variants: Sequence[Variant],
    keep: str,
    evaluators: Sequence[object],
    *,
    work_dir: str | os.PathLike,
    side: str = "left",
    seed: int = 0,
    include_full: bool = True,
    progress: bool = True,
) -> list[dict]:
    """Every row of `run_variants` over the reference `source`, its spectra kept on disk in a temporary
    folder under `work_dir` while the variants are scored (removed afterwards)."""
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".posthoc-spectra-", dir=work_dir) as spectra:
        grid = SubspaceGrid(source, list(run.targets), side, seed, progress, cache_dir=spectra)
        return list(run_variants(module, run, grid, variants, keep, evaluators, include_full))


def write_variant_rows(rows: Sequence[dict], out_dir: str | os.PathLike) -> Path:
    """posthoc.csv and posthoc.json in `out_dir`, each written atomically; returns the CSV path."""
    write_rows(rows, Path(out_dir) / "posthoc.json")
    return write_rows(rows, Path(out_dir) / "posthoc.csv")
