"""SubspaceDrift: how much of a run's cumulative update falls inside a subspace, over training.

Every `every_n_steps` optimizer steps (and at train end) it measures, per governed weight, the share
of the update's energy inside range(P_k),

    share = ‖P ΔW‖_F² / ‖ΔW‖_F²,    ΔW = W − W₀  (full weights)  or  s·B·A  (LoRA),

beside the share a random direction would have (`random_share`: k/m for the left side). The overall
value pools the energy of all weights (Σ‖PΔW‖² / Σ‖ΔW‖²) and its random baseline is weighted the
same way. Alone, it tells how much an unprojected run moves into the safety subspace; beside
`OnlineProjection` it confirms the projection (≈1 for keep="parallel", ≈0 for keep="orthogonal").

Memory: W₀ of the governed full weights is kept once on CPU (one copy of those weights) and stored
in the checkpoint, so a resumed run keeps measuring against the original start. Each measurement
moves W₀ to the weights' device one tensor at a time and costs one projection per weight.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from safeproj.plots import heatmap
from safeproj.callbacks._options import basis_options
from safeproj.core.targets import Target, find_targets
from safeproj.model.subspaces import expand_spec, resolve_basis
from safeproj.core.basis import Basis
from safeproj.core.projector import energy_share, random_share
from safeproj.core.spectrum import squared_norm
from safeproj.io import write_csv
from safeproj.wandb import log_images, log_table

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")
OVERALL = "overall"
COLUMNS = ("step", "name", "layer", "share", "random", "energy")
# Wider heatmaps stop being readable; the CSV keeps every measurement.
MAX_HEATMAP_COLUMNS = 48


def layer_of(name: str) -> str:
    """`layer_3` for a weight inside decoder block 3, else the module name (`lm_head`)."""
    match = _LAYER.search(name)
    return f"layer_{int(match.group(1))}" if match else name.removesuffix(".weight")


def layer_means(rows: list[dict]) -> dict[str, float]:
    """Mean share per layer over the tensors of one measurement (NaN shares left out)."""
    groups: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        if row["name"] != OVERALL and not math.isnan(row["share"]):
            groups[row["layer"]].append(row["share"])
    return {layer: sum(v) / len(v) for layer, v in groups.items()}


def _layer_order(layer: str) -> tuple:
    return (0, int(layer.split("_")[1]), "") if re.fullmatch(r"layer_\d+", layer) else (1, 0, layer)


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
        selection: str = "top",
        side: str = "left",
        seed: int = 0,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        out_dir: str | None = None,
    ) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise MisconfigurationException(f"SubspaceDrift every_n_steps must be an integer >= 1, got {every_n_steps!r}")
        self.subspace = subspace
        self.every_n_steps = every_n_steps
        self.options = basis_options(
            "SubspaceDrift", frac=frac, eta=eta, selection=selection, side=side, seed=seed, include=include, exclude=exclude
        )
        self.out_dir = out_dir
        self.basis: Basis | None = None
        self.targets: list[Target] = []
        self.history: list[dict] = []
        self.last_step = -1
        self._initial: dict[str, Tensor] = {}
        self._restored: dict[str, Tensor] | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(subspace=self.subspace, side=self.options.side, selection=self.options.selection)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or self.basis is not None:
            return
        try:
            spec = expand_spec(self.subspace, getattr(pl_module, "model_name", None))
            self.basis = resolve_basis(spec, self.options, progress=trainer.is_global_zero)
            self.targets = self._match(pl_module.model)
        except ValueError as err:
            raise MisconfigurationException(f"SubspaceDrift: {err}") from None

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
        # Here rather than on_fit_start: every strategy has restored the weights by now.
        restored = self._restored or {}
        self._initial = {
            t.name: (restored[t.name] if t.name in restored else t.weight.detach()).to("cpu", copy=True)
            for t in self.targets
            if not t.is_lora
        }
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
        metrics = self.metrics(rows)
        _log_metrics(trainer, metrics, step)
        return metrics

    @torch.no_grad()
    def measure(self, step: int) -> list[dict]:
        """One row per weight plus the pooled `overall` row, as plain values."""
        rows = []
        kept = total = random_total = 0.0
        for t in self.targets:
            entry = self.basis.entries[t.name]
            delta = self.update(t)
            energy = squared_norm(delta)
            share = energy_share(delta, entry) if energy > 0 else math.nan
            baseline = random_share(entry)
            rows.append(
                {"step": step, "name": t.name, "layer": layer_of(t.name), "share": share, "random": baseline, "energy": energy}
            )
            if energy > 0:
                kept, total, random_total = kept + share * energy, total + energy, random_total + baseline * energy
        # Pooled like the share itself; with no update yet, the plain mean of the baselines.
        overall_random = random_total / total if total > 0 else sum(r["random"] for r in rows) / len(rows)
        rows.append(
            {
                "step": step,
                "name": OVERALL,
                "layer": OVERALL,
                "share": kept / total if total > 0 else math.nan,
                "random": overall_random,
                "energy": total,
            }
        )
        return rows

    def update(self, t: Target) -> Tensor:
        """ΔW in float32 on the weight's device."""
        if t.is_lora:
            return t.delta_weight()
        return t.weight.float() - self._initial[t.name].to(t.weight.device).float()

    @staticmethod
    def metrics(rows: list[dict]) -> dict[str, float]:
        overall = next(r for r in rows if r["name"] == OVERALL)
        metrics = {"drift/overall": overall["share"], "drift/random": overall["random"]}
        metrics.update({f"drift/{layer}": v for layer, v in layer_means(rows).items()})
        return metrics

    def _write(self, trainer: Trainer) -> None:
        out = Path(self.out_dir or Path(trainer.default_root_dir) / "drift")
        csv_path = write_history(self.history, out / "drift.csv")
        png = plot_history(self.history, out / "drift_heatmap.png")
        log_images(trainer.loggers, "drift/heatmap", [str(png)])
        log_table(trainer.loggers, "drift/history", self.history)
        last = self.history[-1]
        rank_zero_info(
            f"SubspaceDrift: {last['share']:.3f} of the update's energy lies in the subspace "
            f"(random {last['random']:.3f}) after {last['step']} steps -> {csv_path}"
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "history": [dict(r) for r in self.history],
            "last_step": self.last_step,
            "initial": {k: v.detach().cpu() for k, v in self._initial.items()},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Runs before on_train_start: stash W₀, applied there.
        self.history = [dict(r) for r in state_dict.get("history", [])]
        self.last_step = int(state_dict.get("last_step", -1))
        self._restored = state_dict.get("initial") or None


@rank_zero_only
def _log_metrics(trainer: Trainer, metrics: dict[str, float], step: int) -> None:
    # Straight to the loggers: Trainer(log_every_n_steps) would otherwise drop most measurements.
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


def write_history(rows: list[dict], path: Path) -> Path:
    """The history as CSV, written atomically."""
    return write_csv(path, rows, COLUMNS)


def plot_history(rows: list[dict], path: Path) -> Path:
    """Heatmap of per-layer mean shares (rows: layers, then the pooled `overall`; columns: steps).

    Layer rows average their weights' shares; `overall` pools energy, so it weighs large updates more.
    """
    by_step: dict[int, list[dict]] = defaultdict(list)
    for row in rows:
        by_step[row["step"]].append(row)
    steps = sorted(by_step)
    if len(steps) > MAX_HEATMAP_COLUMNS:
        # Evenly spaced measurements, always keeping the last one.
        picks = {round(i * (len(steps) - 1) / (MAX_HEATMAP_COLUMNS - 1)) for i in range(MAX_HEATMAP_COLUMNS)}
        steps = [steps[i] for i in sorted(picks)]
    means = {step: layer_means(by_step[step]) for step in steps}
    overall = {step: next(r for r in by_step[step] if r["name"] == OVERALL) for step in steps}
    layers = sorted({layer for m in means.values() for layer in m}, key=_layer_order)
    values = [[means[s].get(layer, math.nan) for s in steps] for layer in layers]
    values.append([overall[s]["share"] for s in steps])
    baseline = overall[steps[-1]]["random"]
    return heatmap(
        values,
        path,
        row_labels=layers + [OVERALL],
        col_labels=[str(s) for s in steps],
        title=f"Update energy in the subspace (pooled random {baseline:.2f})",
        xlabel="optimizer step",
        ylabel="layer",
        colorbar_label="‖PΔW‖² / ‖ΔW‖²",
    )
