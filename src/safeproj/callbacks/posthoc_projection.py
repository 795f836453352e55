"""PosthocProjection: at train end, score W₀ + P·Δ_T for a grid of subspaces, one row per variant."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from tqdm.auto import tqdm
from typing_extensions import override

from safeproj.core.options import KEEPS
from safeproj.core.targets import Target, find_weights
from safeproj.model.subspaces import delta_source, expand_spec
from safeproj.core.basis import BasisEntry, Factor
from safeproj.core.projector import project, project_left, project_right
from safeproj.core.spectrum import gaussian_factors, k_for_frac, select_vectors, side_spectrum

FRACS = (0.01, 0.25, 0.5, 0.75, 0.99)
SELECTIONS = ("top", "random-k", "random")
SIDES = ("left", "right", "both")


@dataclass
class Variant:
    frac: float
    selection: str

    @property
    def name(self) -> str:
        return f"{self.selection}@{self.frac:g}"


class SubspaceGrid:
    """Singular vectors of a reference delta, computed once per tensor and reused for every variant."""

    def __init__(self, source, names: Sequence[str], side: str = "left", seed: int = 0, progress: bool = True):
        if side not in SIDES:
            raise ValueError(f"side={side!r}: expected one of {SIDES}")
        self.side, self.seed = side, seed
        self.vectors: dict[str, dict[str, torch.Tensor]] = {}
        self._gaussian: dict[tuple[str, str], torch.Tensor] = {}
        self.shapes: dict[str, tuple[int, int]] = {}
        available = set(source.names())
        missing = [n for n in names if n not in available]
        if missing:
            raise ValueError(f"reference subspace has no tensor {missing[0]}")
        for name in tqdm(names, desc="reference spectra", disable=not progress):
            delta = source.get(name)
            delta = delta.reshape(-1, 1) if delta.ndim == 1 else delta
            self.shapes[name] = tuple(delta.shape)
            sides = ("left", "right") if side == "both" else (side,)
            self.vectors[name] = {s: side_spectrum(delta, side=s)[0] for s in sides}

    def gaussian_vectors(self, name: str, side: str) -> torch.Tensor:
        """The "random" control's singular vectors: one Gaussian SVD per tensor, shared by every frac."""
        if (name, side) not in self._gaussian:
            U, _, V = gaussian_factors(self.shapes[name], self.seed, name, left=side == "left", right=side == "right")
            self._gaussian[name, side] = U if side == "left" else V
        return self._gaussian[name, side]

    def entry(self, name: str, variant: Variant) -> BasisEntry:
        m, n = self.shapes[name]
        k = k_for_frac(variant.frac, m, n)
        factors = {}
        for s, Q in self.vectors[name].items():
            if variant.selection == "random":  # the top k of the same Gaussian select_vectors would draw
                Q, selection = self.gaussian_vectors(name, s), "top"
            else:
                selection = variant.selection
            factors[s] = Factor(select_vectors(Q, k, selection, seed=self.seed, name=name), complement=False)
        return BasisEntry(
            name=name,
            shape=(m, n),
            left=factors.get("left"),
            right=factors.get("right"),
            energy_kept=float("nan"),
            energy_total=float("nan"),
            spectrum=None,
        )


class WeightVariants:
    """Swaps W₀ + P·Δ_T into the model tensor by tensor and restores the trained weights afterwards."""

    def __init__(self, targets: Sequence[Target], initial: dict[str, torch.Tensor], keep: str):
        if keep not in KEEPS:
            raise ValueError(f"keep={keep!r}: expected one of {KEEPS}")
        self.targets, self.keep = list(targets), keep
        self.initial = {
            t.name: initial[t.name].to(t.weight.device) for t in self.targets if not t.is_lora
        }
        self.trained = {
            t.name: (t.lora_b.detach().clone(), t.lora_a.detach().clone())
            if t.is_lora
            else t.weight.detach().clone()
            for t in self.targets
        }

    def update(self, t: Target) -> torch.Tensor:
        if t.is_lora:
            b, a = self.trained[t.name]
            return t.scaling * (b.float() @ a.float())
        return self.trained[t.name].float() - self.initial[t.name].float()

    @torch.no_grad()
    def apply(self, entries: dict[str, BasisEntry] | None) -> float:
        """Set every target to its projected variant (None = the trained weights); pooled energy kept."""
        kept = total = 0.0
        for t in self.targets:
            delta = self.update(t)
            total += float(delta.pow(2).sum())
            if entries is None:
                kept += float(delta.pow(2).sum())
                self._restore(t)
                continue
            entry = entries[t.name]
            if t.is_lora:
                b, a = self.trained[t.name]
                if self.keep == "orthogonal" and entry.left is not None and entry.right is not None:
                    raise ValueError("keep='orthogonal' with side='both' cannot be applied to LoRA factors")
                t.lora_b.copy_(project_left(b, entry.left, self.keep) if entry.left is not None else b)
                t.lora_a.copy_(project_right(a, entry.right, self.keep) if entry.right is not None else a)
                kept += float(t.delta_weight().pow(2).sum())
            else:
                projected = project(delta, entry, self.keep)
                kept += float(projected.pow(2).sum())
                t.weight.copy_(self.initial[t.name].float() + projected)
        return kept / total if total > 0 else float("nan")

    def restore(self) -> None:
        for t in self.targets:
            self._restore(t)

    @torch.no_grad()
    def _restore(self, t: Target) -> None:
        if t.is_lora:
            b, a = self.trained[t.name]
            t.lora_b.copy_(b)
            t.lora_a.copy_(a)
        else:
            t.weight.copy_(self.trained[t.name])


def run_variants(
    module,
    targets: Sequence[Target],
    initial: dict[str, torch.Tensor],
    grid: SubspaceGrid,
    variants: Sequence[Variant],
    keep: str,
    evaluators: Sequence[object],
    include_full: bool = True,
) -> Iterator[dict]:
    """Yields one row per variant: its settings, the pooled energy share kept, and every evaluator's metrics.

    An evaluator has `evaluate(module) -> dict`; its metrics are prefixed with its `prefix` ("utility/...").
    """
    swap = WeightVariants(targets, initial, keep)
    plan: list[Variant | None] = ([None] if include_full else []) + list(variants)
    try:
        for variant in tqdm(plan, desc="post hoc variants"):
            entries = None if variant is None else {t.name: grid.entry(t.name, variant) for t in targets}
            share = swap.apply(entries)
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


def write_variant_rows(rows: Sequence[dict], out_dir: Path) -> Path:
    """posthoc.csv and posthoc.json in `out_dir`, each written atomically; returns the CSV path."""
    from safeproj.commands.overlap import write_rows

    write_rows(rows, Path(out_dir) / "posthoc.json")
    return write_rows(rows, Path(out_dir) / "posthoc.csv")


class PosthocProjection(Callback):
    """At train end, projects the run's update Δ_T = W − W₀ onto (or away from) reference subspaces.

    Each variant W₀ + P·Δ_T (frac × selection) is put into the model in place, scored by every
    attached callback that has `evaluate(pl_module) -> dict` (UtilityEval, HarmEval), and logged as one
    row; the trained weights are restored afterwards. The reference spectra are computed once per tensor.

    Args:
        subspace: a delta spec or `safety:<preset>` (see `safeproj.model.subspaces`).
        fracs: rank fractions k = round(frac·min(m, n)).
        selections: "top", "random-k", "random".
        keep: "parallel" (P_k Δ_T, the paper's first experiment) or "orthogonal" (P_k⊥ Δ_T).
        side: "left" (the paper's choice), "right" or "both".
        include_full: also score the unprojected run.
        out_dir: where posthoc.csv/json go; default `<default_root_dir>/posthoc`.
    """

    def __init__(
        self,
        subspace: str,
        fracs: list[float] = list(FRACS),
        selections: list[str] = list(SELECTIONS),
        keep: str = "parallel",
        side: str = "left",
        seed: int = 0,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        include_full: bool = True,
        out_dir: str | None = None,
    ) -> None:
        if keep not in KEEPS:
            raise MisconfigurationException(f"PosthocProjection keep={keep!r}: expected one of {KEEPS}")
        if side not in SIDES:
            raise MisconfigurationException(f"PosthocProjection side={side!r}: expected one of {SIDES}")
        bad = [s for s in selections if s not in SELECTIONS]
        if bad:
            raise MisconfigurationException(f"PosthocProjection selection {bad[0]!r}: expected one of {SELECTIONS}")
        bad_frac = [f for f in fracs if not 0.0 < f <= 1.0]
        if bad_frac:
            raise MisconfigurationException(f"PosthocProjection frac {bad_frac[0]}: must be in (0, 1]")
        self.subspace, self.keep, self.side, self.seed = subspace, keep, side, seed
        self.include, self.exclude = include, exclude
        self.variants = [Variant(f, s) for s in selections for f in fracs]
        self.include_full = include_full
        self.out_dir = out_dir
        self._initial: dict[str, torch.Tensor] = {}
        self.rows: list[dict] = []

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # W₀ of the full-FT tensors, on CPU; LoRA updates are read from the adapters themselves.
        self._source = delta_source(expand_spec(self.subspace, getattr(pl_module, "model_name", None)), self.include, self.exclude)
        self._targets = find_weights(pl_module.model, self._source.names())
        self._initial = {t.name: t.weight.detach().to("cpu", copy=True) for t in self._targets if not t.is_lora}

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Every rank scores every variant: evaluators split their prompts across ranks and gather.
        names = [t.name for t in self._targets]
        grid = SubspaceGrid(self._source, names, side=self.side, seed=self.seed, progress=trainer.is_global_zero)
        evaluators = [cb for cb in trainer.callbacks if callable(getattr(cb, "evaluate", None))]
        self.rows = list(
            run_variants(pl_module, self._targets, self._initial, grid, self.variants, self.keep, evaluators, self.include_full)
        )
        if not trainer.is_global_zero:
            return
        out = Path(self.out_dir or Path(trainer.default_root_dir) / "posthoc")
        csv_path = write_variant_rows(self.rows, out)
        from safeproj.wandb import log_table

        log_table(trainer.loggers, "posthoc/variants", self.rows)
        rank_zero_info(f"PosthocProjection: {len(self.rows)} variants scored -> {csv_path}")
