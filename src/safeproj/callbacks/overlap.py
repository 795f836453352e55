"""OverlapCallback: at train end, the Mode Subspace Overlap of the run's own update with reference subspaces."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from safeproj import wandb as wandb_logs
from safeproj.callbacks._options import check_option, misconfigured
from safeproj.callbacks._sharding import refuse_flat_parameters, target_is_sharded
from safeproj.core.deltas import RunDelta, select_names
from safeproj.core.options import ETAS, SIDES, Side, check_fractions
from safeproj.core.overlap import aggregate, mso_tables, sharded_mso_tables
from safeproj.core.sharded import run_update_rows
from safeproj.core.spectra import SpectrumCache, Subspaces
from safeproj.core.targets import Target, model_weights
from safeproj.io import write_rows
from safeproj.model.subspaces import load_subspaces
from safeproj.plots import overlap as overlap_plots

_LABEL = re.compile(r"[A-Za-z0-9_.-]+")


class OverlapCallback(Callback):
    """Compares the run's update Δ_T = W_end − W_start with reference subspaces by Mode Subspace Overlap.

    At train end (rank zero), for each reference and each η, MSO(Δ_T, Δ_ref; η) is computed per tensor
    (one SVD per tensor and delta for the whole η grid), then:
    - the rows go to `<out_dir>/<ref>.csv` and, with a WandbLogger, a W&B table `overlap/<ref>/table`;
    - MSO-vs-η lines with the random baseline and a layer × η heatmap of MSO/baseline are written as
      PNG and sent as W&B images `overlap/<ref>/plots`;
    - model-level scalars `overlap/<ref>/{mso,baseline,ratio}@<η>` go to every attached logger.

    Δ_T is read through a RunDelta: W_start from the module's `base_dir` (the starting weights on disk,
    as SafeprojLM exposes) for every tensor it holds, otherwise from a CPU copy made at train start and
    kept in the callback's checkpoint state, so a resumed run still measures from the true start.
    LoRA modules use the merged ΔW = scale·B·A. Tensor names are the plain Hugging Face names.

    Under FSDP2 (weights as DTensors sharded by rows) every process computes the tables together from
    its own rows, gathering no weight (`core.overlap.sharded_mso_tables`: one n×n float64 all-reduce of
    each tensor's Gram matrix, then small ones); LoRA pairs gather their small factor A (r×n). Rank zero
    writes and logs. FSDP (v1) is refused at setup.

    Args:
        references: label → reference subspace: a delta spec (`TUNED,BASE`, adapter or run dir,
            `safety:<preset>`) or a basis artifact (`.safetensors`) that keeps its spectrum.
            Labels name files and metric keys: letters, digits, `_`, `.`, `-`.
        etas: energy shares η in (0, 1].
        include: regexes of tensor names (default: attention and MLP projections of decoder blocks).
        exclude: regexes of tensor names to leave out.
        side: "left" (output side, the paper's choice) or "right".
        out_dir: where tables and plots go; default `<default_root_dir>/overlap`.

    Raises:
        MisconfigurationException: on empty or badly named references, η outside (0, 1], an unknown
            side, a reference that cannot be read, or a model sharing no trainable tensor with it.
    """

    def __init__(
        self,
        references: dict[str, str],
        etas: list[float] = list(ETAS),
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        side: Side = "left",
        out_dir: str | None = None,
    ) -> None:
        if not isinstance(references, dict) or not references:
            raise MisconfigurationException("OverlapCallback references: give at least one {label: subspace spec}")
        for label, spec in references.items():
            if not isinstance(label, str) or not _LABEL.fullmatch(label):
                raise MisconfigurationException(
                    f"OverlapCallback reference label {label!r}: use letters, digits, '_', '.', '-'"
                )
            if not isinstance(spec, str) or not spec:
                raise MisconfigurationException(f"OverlapCallback reference {label!r}: spec must be a non-empty string")
        with misconfigured("OverlapCallback"):
            self.etas = check_fractions("eta", etas)
        check_option("OverlapCallback", "side", side, SIDES)
        self.references = dict(references)
        self.include, self.exclude, self.side, self.out_dir = include, exclude, side, out_dir
        self.tables: dict[str, list[dict]] = {}
        self._sources: dict[str, Subspaces] = {}
        self._targets: dict[str, Target] = {}
        self._run: RunDelta | None = None
        self._sharded = False
        self._start_dir: str | None = None  # where W_start was read from, when a folder held it
        self._restored: dict[str, torch.Tensor] | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(references=sorted(self.references.items()), side=self.side)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        refuse_flat_parameters("OverlapCallback", trainer)
        if not isinstance(getattr(pl_module, "model", None), torch.nn.Module):
            raise MisconfigurationException(
                "OverlapCallback needs the LightningModule's Hugging Face model at `.model`"
            )
        for label, spec in self.references.items():
            try:
                self._sources[label] = load_subspaces(spec, self.include, self.exclude)
            except (ValueError, FileNotFoundError) as err:
                raise MisconfigurationException(f"OverlapCallback reference {label!r} ({spec}): {err}") from None

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        weights, _ = model_weights(pl_module.model)
        wanted = set().union(*(source.names() for source in self._sources.values()))
        # Only weights that can move: frozen ones have a zero update, which spans no subspace.
        names = [
            n
            for n in select_names(list(weights), self.include, self.exclude)
            if n in wanted and (weights[n].is_lora or weights[n].weight.requires_grad)
        ]
        if not names:
            raise MisconfigurationException(
                "OverlapCallback: the model has no trainable tensor in common with the references "
                f"({', '.join(self.references)}); check include/exclude"
            )
        self._targets = {n: weights[n] for n in names}
        # Sharded weights are measured on every process's rows together; whole ones on rank zero alone.
        self._sharded = any(target_is_sharded(t) for t in self._targets.values())
        if trainer.is_global_zero or self._sharded:
            base_dir = getattr(pl_module, "base_dir", None)
            self._run = RunDelta(self._targets.values(), base_dir, held=self._restored)
            self._start_dir = base_dir if self._run.on_disk else None
        self._restored = None

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._run is None:
            return
        cache = SpectrumCache(side=self.side)
        # References may cover more tensors than the run trains (LoRA on a few modules): compare the shared ones.
        if self._sharded:
            run = self._run
            self.tables = sharded_mso_tables(
                run,
                lambda name: run_update_rows(run, name),
                self._sources,
                self.etas,
                side=self.side,
                cache=cache,
                progress=trainer.is_global_zero,
                warn_unshared=False,
            )
        else:
            self.tables = mso_tables(
                self._run, self._sources, self.etas, side=self.side, cache=cache, progress=True, warn_unshared=False
            )
        self._run = None  # lets go of the start copies
        if not trainer.is_global_zero:
            return
        out = Path(self.out_dir or Path(trainer.default_root_dir) / "overlap")
        metrics: dict[str, float] = {}
        for label, rows in self.tables.items():
            if rows:
                metrics.update(self._report(trainer, label, rows, out))
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        mid = self.etas[len(self.etas) // 2]
        summary = ", ".join(
            f"{label} {metrics[key]:.2f} ({len({r['name'] for r in self.tables[label]})} tensors)"
            for label in self.tables
            if (key := f"overlap/{label}/ratio@{mid:g}") in metrics
        )
        rank_zero_info(f"OverlapCallback: MSO/baseline at η={mid:g}: {summary} -> {out}")

    @staticmethod
    def _report(trainer: Trainer, label: str, rows: list[dict], out: Path) -> dict[str, float]:
        """Writes one reference's table and figures, sends them to W&B, and returns its model-level scalars."""
        by_module, by_layer, model = (aggregate(rows, by) for by in ("module", "layer", "model"))
        write_rows(rows, out / f"{label}.csv")
        lines = overlap_plots.mso_vs_eta(
            by_module, model, out / f"{label}_mso_vs_eta.png", title=f"MSO: run update vs {label}"
        )
        heat = overlap_plots.ratio_heatmap(
            by_layer, out / f"{label}_ratio_heatmap.png", title=f"MSO / baseline: run vs {label}"
        )
        figures = [str(p) for p in (lines, heat) if p is not None]
        wandb_logs.log_table(trainer.loggers, f"overlap/{label}/table", rows, step=trainer.global_step)
        wandb_logs.log_images(trainer.loggers, f"overlap/{label}/plots", figures, step=trainer.global_step)
        return {
            f"overlap/{label}/{key}@{row['eta']:g}": row[key] for row in model for key in ("mso", "baseline", "ratio")
        }

    @override
    def state_dict(self) -> dict[str, Any]:
        # A resume needs the start to measure the whole run's update: whatever no start folder holds.
        return {"start": dict(self._run.held) if self._run else {}, "start_dir": self._start_dir}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Runs before on_train_start, where the RunDelta takes the restored copies.
        self._restored = state_dict.get("start") or None
