"""SubspaceDrift: how much of a run's cumulative update falls inside a subspace, over training.

Every `every_n_steps` optimizer steps (and at train end) it measures, per governed weight, the share
of the update's energy inside range(P_k),

    share = ‖P ΔW‖_F² / ‖ΔW‖_F²,    ΔW = W − W₀  (full weights)  or  s·B·A − s·B₀·A₀  (LoRA),

beside the share a random subspace would keep (`random_share`: k/m for the left side). The overall
value pools the energy of all weights (Σ‖PΔW‖² / Σ‖ΔW‖²) and its random baseline is weighted the
same way (`safeproj.core.drift`). Alone, it tells how much an unprojected run moves into the safety
subspace; beside `OnlineProjection` it confirms the projection (≈1 for keep="parallel", ≈0 for
keep="orthogonal").

Memory: ΔW comes from a RunDelta. W₀ is read per tensor from the module's `base_dir` (the run's start
on disk, as SafeprojLM exposes) where it holds the weight; otherwise W₀ of the governed weights is
copied once to CPU and kept in the checkpoint, so a resumed run measures against the original start.
A measurement moves one W₀ at a time to the weights' device and costs one projection per weight.

FSDP2 (weights as DTensors sharded by rows): each process measures its own rows against W₀'s rows, and
the squared norms are summed with one small all-reduce per weight (plus the k×n one of a left side);
no weight is gathered. Every process measures, rank zero logs and writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from safeproj.callbacks._options import basis_options, misconfigured
from safeproj.core import drift
from safeproj.core.basis import Basis
from safeproj.core.deltas import RunDelta
from safeproj.core.options import BasisSide, Selection
from safeproj.core.targets import Target, find_targets
from safeproj.io import write_csv
from safeproj.model.subspaces import expand_spec, resolve_basis
from safeproj.plots.drift import drift_heatmap
from safeproj.wandb import log_images, log_table

# Wider heatmaps stop being readable; the CSV keeps every measurement.
MAX_HEATMAP_COLUMNS = 48


class SubspaceDrift(Callback):
    """Logs the share of the cumulative update inside range(P_k), per weight, per layer and overall.

    Scalars: `drift/overall`, `drift/random` (its random expectation) and `drift/<layer>` (mean share of
    the layer's weights), sent to every logger at each measurement and to `pl_module.log` (so they
    reach callback metrics and monitors). At train end, `out_dir/drift.csv` holds the full history
    (one row per step and weight, plus the pooled row `overall`) and `out_dir/drift_heatmap.png` the
    layer × step means; both also go to W&B (image and table) when a WandbLogger is attached.

    Args:
        subspace: basis artifact, `safety:<preset>`, or a delta spec (see `safeproj.model.subspaces`).
        every_n_steps: measure every N optimizer steps (and always at train end).
        frac, eta, selection, side, seed, include, exclude: how to build the basis from a delta (ignored
            when `subspace` is an artifact); use the same values as an `OnlineProjection` beside it.
        out_dir: where drift.csv and the heatmap go; default `<default_root_dir>/drift`.

    Raises:
        MisconfigurationException: on a bad argument, or a basis that does not fit the model.
    """

    def __init__(
        self,
        subspace: str,
        every_n_steps: int = 10,
        frac: float | None = None,
        eta: float | None = None,
        selection: Selection = "top",
        side: BasisSide = "left",
        seed: int = 0,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        out_dir: str | None = None,
    ) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise MisconfigurationException(
                f"SubspaceDrift every_n_steps must be an integer >= 1, got {every_n_steps!r}"
            )
        self.subspace = subspace
        self.every_n_steps = every_n_steps
        self.options = basis_options(
            "SubspaceDrift",
            frac=frac,
            eta=eta,
            selection=selection,
            side=side,
            seed=seed,
            include=include,
            exclude=exclude,
        )
        self.out_dir = out_dir
        self.basis: Basis | None = None
        self.targets: list[Target] = []
        self.run: RunDelta | None = None
        self.history: list[dict] = []
        self.last_step = -1
        self._restored: dict[str, Tensor] | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            subspace=self.subspace, side=self.options.side, selection=self.options.selection
        )

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or self.basis is not None:
            return
        with misconfigured("SubspaceDrift"):
            spec = expand_spec(self.subspace, getattr(pl_module, "model_name", None))
            self.basis = resolve_basis(spec, self.options, progress=trainer.is_global_zero)
            self.targets = self._match(pl_module.model)

    def _match(self, model: torch.nn.Module) -> list[Target]:
        """Basis entries the run can change; frozen weights without adapters keep ΔW = 0 and are skipped."""
        targets = find_targets(model, self.basis)
        if not targets:
            raise ValueError("no weight of the basis is trained in this model (all frozen, no LoRA adapter)")
        skipped = len(self.basis.entries) - len(targets)
        if skipped:
            rank_zero_info(f"SubspaceDrift: {skipped} frozen weights without adapters are not measured")
        return targets

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Here rather than on_fit_start: every strategy has restored the weights by now. The weights are
        # found again: FSDP2 (configure_model, after setup) replaces the parameters.
        with misconfigured("SubspaceDrift"):
            self.targets = find_targets(pl_module.model, self.basis)
        self.run = RunDelta(self.targets, getattr(pl_module, "base_dir", None), held=self._restored)
        self._restored = None

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        # global_step advances once per optimizer step; with accumulation this hook fires more often.
        step = trainer.global_step
        if step > 0 and step != self.last_step and step % self.every_n_steps == 0:
            metrics = self._record(trainer, step)
            for key, value in metrics.items():
                pl_module.log(key, value, on_step=True, on_epoch=False, logger=False, batch_size=1)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_step != self.last_step:
            self._record(trainer, trainer.global_step)
        if trainer.is_global_zero and self.history:
            self._write(trainer)

    def _record(self, trainer: Trainer, step: int) -> dict[str, float]:
        rows = self.measure(step)
        self.history.extend(rows)
        self.last_step = step
        metrics = drift.metrics(rows)
        _log_metrics(trainer, metrics, step)
        return metrics

    def measure(self, step: int) -> list[dict]:
        """One row per weight plus the pooled `overall` row, as plain values."""
        return drift.measure(self.run, self.basis, step)

    def _write(self, trainer: Trainer) -> None:
        out = Path(self.out_dir or Path(trainer.default_root_dir) / "drift")
        csv_path = write_csv(out / "drift.csv", self.history, drift.COLUMNS)
        layers, steps, values, baseline = drift.layer_step_grid(self.history, MAX_HEATMAP_COLUMNS)
        png = drift_heatmap(values, layers, steps, baseline, out / "drift_heatmap.png")
        log_images(trainer.loggers, "drift/heatmap", [str(png)])
        log_table(trainer.loggers, "drift/history", self.history)
        last = self.history[-1]
        rank_zero_info(
            f"SubspaceDrift: {last['share']:.3f} of the update's energy lies in the subspace "
            f"(random {last['random']:.3f}) after {last['step']} steps -> {csv_path}"
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        held = self.run.held if self.run is not None else (self._restored or {})
        return {"history": [dict(r) for r in self.history], "last_step": self.last_step, "initial": dict(held)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Runs before on_train_start: stash the start copies, which the RunDelta made there takes.
        self.history = [dict(r) for r in state_dict.get("history", [])]
        self.last_step = int(state_dict.get("last_step", -1))
        self._restored = state_dict.get("initial") or None


@rank_zero_only
def _log_metrics(trainer: Trainer, metrics: dict[str, float], step: int) -> None:
    # Straight to the loggers: Trainer(log_every_n_steps) would otherwise drop most measurements.
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)
