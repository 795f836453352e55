"""PosthocProjection: at train end, score W₀ + P·Δ_T for a grid of subspaces, one row per variant."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from typing_extensions import override

from safeproj import wandb as wandb_logs
from safeproj.callbacks._options import basis_options, check_option, misconfigured
from safeproj.core.deltas import DeltaSource, RunDelta
from safeproj.core.energy import Variant, check_grid
from safeproj.core.options import FRACS, KEEPS, SELECTIONS, BasisSide, Keep, Selection
from safeproj.core.targets import Target, find_weights
from safeproj.core.variants import score_variants, write_variant_rows
from safeproj.model.subspaces import delta_source, expand_spec


class PosthocProjection(Callback):
    """At train end, projects the run's update Δ_T = W − W₀ onto (or away from) reference subspaces.

    Each variant W₀ + P·Δ_T (frac × selection) is put into the model in place, scored by every
    attached callback that has `evaluate(pl_module) -> dict` (UtilityEval, HarmEval), and logged as one
    row; the trained weights are restored afterwards. The reference spectra are computed once per
    tensor and kept on disk under the run's directory while the variants are scored, so besides one
    copy of the trained weights only a few tensors are in memory (`safeproj.core.variants`). W₀ is read
    per tensor from the module's `base_dir` (the run's start on disk) where it holds the weight, and
    otherwise copied at train start and kept in the checkpoint for a resumed run.

    FSDP2 (weights as DTensors sharded by rows): each process projects and writes its own rows
    (`safeproj.core.sharded`: one k×n all-reduce per tensor for the left side, none for the right), keeps
    the trained copy and W₀ of those rows only, and no weight is gathered; every process runs the same
    evaluators in step, so their sharded forward calls match.

    Args:
        subspace: a delta spec or `safety:<preset>` (see `safeproj.model.subspaces`).
        fracs: rank fractions k = round(frac·min(m, n)).
        selections: "top", "random-k", "random".
        keep: "parallel" (P_k Δ_T, the paper's first experiment) or "orthogonal" (P_k⊥ Δ_T).
        side: "left" (the paper's choice), "right" or "both".
        seed: seed of the random selections.
        include, exclude: regexes of tensor names (default: attention and MLP projections).
        include_full: also score the unprojected run.
        out_dir: where posthoc.csv/json go; default `<default_root_dir>/posthoc`.

    Raises:
        MisconfigurationException: on a bad argument, or a reference that does not fit the model.
    """

    def __init__(
        self,
        subspace: str,
        fracs: list[float] = list(FRACS),
        selections: list[Selection] = list(SELECTIONS),
        keep: Keep = "parallel",
        side: BasisSide = "left",
        seed: int = 0,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        include_full: bool = True,
        out_dir: str | None = None,
    ) -> None:
        check_option("PosthocProjection", "keep", keep, KEEPS)
        self.options = basis_options("PosthocProjection", side=side, seed=seed, include=include, exclude=exclude)
        with misconfigured("PosthocProjection"):
            fracs, selections = check_grid(fracs, selections)
        self.subspace, self.keep = subspace, keep
        self.variants = [Variant(f, s) for s in selections for f in fracs]
        self.include_full = include_full
        self.out_dir = out_dir
        self.rows: list[dict] = []
        self._source: DeltaSource | None = None
        self._targets: list[Target] = []
        self._run: RunDelta | None = None
        self._restored: dict[str, Tensor] | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(subspace=self.subspace, keep=self.keep, side=self.options.side)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or self._source is not None:
            return
        with misconfigured("PosthocProjection"):
            spec = expand_spec(self.subspace, getattr(pl_module, "model_name", None))
            self._source = delta_source(spec, self.options.include, self.options.exclude)
            self._targets = find_weights(pl_module.model, self._source.names())

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # LoRA variants project the adapters' factors, which starts from B₀ = 0: only plain weights need W₀.
        # The weights are found again: FSDP2 (configure_model, after setup) replaces the parameters.
        with misconfigured("PosthocProjection"):
            self._targets = find_weights(pl_module.model, self._source.names())
        base_dir = getattr(pl_module, "base_dir", None)
        self._run = RunDelta(self._targets, base_dir, held=self._restored, fresh_adapters=True)
        self._restored = None

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Every rank scores every variant: evaluators split their prompts across ranks and gather. Under
        # FSDP2 each rank writes its rows of every variant, and the evaluators' forward calls run in step.
        evaluators = [cb for cb in trainer.callbacks if callable(getattr(cb, "evaluate", None))]
        root = Path(trainer.default_root_dir)
        self.rows = score_variants(
            pl_module,
            self._run,
            self._source,
            self.variants,
            self.keep,
            evaluators,
            work_dir=root,
            side=self.options.side,
            seed=self.options.seed,
            include_full=self.include_full,
            progress=trainer.is_global_zero,
        )
        self._run = None  # lets go of any start copies
        if not trainer.is_global_zero:
            return
        out = Path(self.out_dir or root / "posthoc")
        csv_path = write_variant_rows(self.rows, out)
        wandb_logs.log_table(trainer.loggers, "posthoc/variants", self.rows)
        rank_zero_info(f"PosthocProjection: {len(self.rows)} variants scored -> {csv_path}")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"start": dict(self._run.held) if self._run is not None else {}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Runs before on_train_start, where the RunDelta takes the restored copies.
        self._restored = state_dict.get("start") or None
