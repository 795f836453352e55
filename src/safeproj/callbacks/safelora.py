"""SafeLoRA as a callback: at train end, rewrite the layers whose update points away from alignment.

The math (C, similarities, layer selection) lives in `safeproj.core.safelora`; this class reads the
alignment delta, finds the trained weights it covers, and rewrites them in place before the
checkpoint is saved.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from tqdm.auto import tqdm
from typing_extensions import override

from safeproj.callbacks._options import basis_options
from safeproj.callbacks._sharding import refuse_flat_parameters, target_is_sharded
from safeproj.core.deltas import CheckpointDelta, DeltaSource, RunDelta
from safeproj.core.safelora import (
    VARIANT_TEXT,
    VARIANTS,
    SafeLoRAProjection,
    Variant,
    cosine_of_rows,
    layer_similarity,
    lora_cosine_of_rows,
    safelora_projection,
    select_layers,
)
from safeproj.core.sharded import row_shard, rows_of, run_update_rows, whole_factor
from safeproj.core.targets import Target, find_weights, model_weights
from safeproj.model.loading import resolve
from safeproj.model.subspaces import delta_source, expand_spec


class SafeLoRA(Callback):
    """At train end, rewrites the layers whose update points away from the alignment directions.

    For every weight the alignment delta covers and the run trains (a LoRA adapter, or a trainable
    full weight), the update ΔW (s·B·A, or W − W₀ with W₀ from the run's start on disk where it is
    there) is compared with C·ΔW; selected layers get B ← C·B (LoRA, exact: s·C·B·A = C·ΔW) or
    W ← W₀ + C·ΔW. Runs before the module's own `on_train_end`, so the saved checkpoint holds the
    rewritten weights. Logs per-layer similarities (`safelora/similarity/<name>`), counts, and a W&B
    table with the variant used.

    Under FSDP2 (weights as DTensors sharded by rows) every process rewrites its own rows, gathering no
    weight: C·X = V(VᵀX)/‖V‖_F with VᵀX summed over rows, one n×r all-reduce per LoRA B (n×n per full
    update, k×r or k×n for the orthonormal variant), and the similarities from sums over rows (a 3×r×r
    all-reduce for LoRA, 3 numbers for a full weight). LoRA pairs gather their small factor A (r×n).
    The alignment delta is read whole on every process, one tensor at a time. FSDP (v1) is refused.

    Args:
        aligned: the aligned checkpoint (a directory, safetensors file or preset); with `base=None`, any
            delta spec instead: `safety:<preset>` (Δ_S of that preset), `safety` (Δ_S of the run's own
            preset), `TUNED,BASE`, an adapter, a run.
        base: the base checkpoint the alignment started from.
        threshold: project layers whose similarity is ≤ threshold.
        num_layers: project the N layers of lowest similarity instead (replaces threshold).
        variant: "safelora" (C = VVᵀ/‖V‖_F, not idempotent) or "orthonormal" (C = U_kU_kᵀ).
        frac, eta: k of the orthonormal variant (eta, when given, replaces frac).
        include, exclude: regexes over tensor names (default: attention and MLP projections).

    Raises:
        MisconfigurationException: on bad arguments, unreadable checkpoints, or a delta that does not
            fit the model.
    """

    def __init__(
        self,
        aligned: str,
        base: str | None = None,
        threshold: float | None = 0.5,
        num_layers: int | None = None,
        variant: Variant = "safelora",
        frac: float | None = None,
        eta: float | None = None,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
    ) -> None:
        if variant not in VARIANTS:
            raise MisconfigurationException(f"SafeLoRA variant={variant!r}: expected one of {VARIANTS}")
        if base is not None and (aligned == "safety" or aligned.startswith("safety:")):
            raise MisconfigurationException(
                f"SafeLoRA aligned={aligned!r} already names its base; leave base unset (got base={base!r})"
            )
        if num_layers is not None:
            if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
                raise MisconfigurationException(f"SafeLoRA num_layers must be an integer >= 1, got {num_layers!r}")
            threshold = None
        elif threshold is None:
            raise MisconfigurationException("SafeLoRA needs threshold or num_layers")
        elif isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not -1 <= threshold <= 1:
            raise MisconfigurationException(f"SafeLoRA threshold must be a cosine in [-1, 1], got {threshold!r}")
        options = basis_options("SafeLoRA", frac=frac, eta=eta)
        frac, eta = options.frac, options.eta
        self.aligned, self.base = aligned, base
        self.threshold, self.num_layers = threshold, num_layers
        self.variant, self.frac, self.eta = variant, frac, eta
        self.include, self.exclude = include, exclude
        self.source: DeltaSource | None = None
        self.targets: list[Target] = []
        self._run: RunDelta | None = None
        self._restored: dict[str, Tensor] | None = None
        self.similarities: dict[str, float] = {}
        self.selected: list[str] = []

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(aligned=self.aligned, base=self.base, variant=self.variant)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        refuse_flat_parameters("SafeLoRA", trainer)
        if self.source is not None:
            return
        try:
            self.source = self._delta_source(getattr(pl_module, "model_name", None))
            self.targets = self._match(pl_module.model)
        except ValueError as err:
            raise MisconfigurationException(f"SafeLoRA: {err}") from None

    def _delta_source(self, model_name: str | None) -> DeltaSource:
        if self.base is None:
            return delta_source(expand_spec(self.aligned, model_name), self.include, self.exclude)
        return CheckpointDelta(resolve(self.aligned), resolve(self.base), include=self.include, exclude=self.exclude)

    def _match(self, model: torch.nn.Module) -> list[Target]:
        """Weights the alignment covers that the run can change (frozen weights keep ΔW = 0)."""
        _, shapes = model_weights(model)
        for name in self.source.names():
            if name in shapes and tuple(self.source.shape(name)) != tuple(shapes[name]):
                delta_shape = tuple(self.source.shape(name))
                raise ValueError(f"weight {name} has shape {tuple(shapes[name])} but its alignment delta {delta_shape}")
        targets = [t for t in find_weights(model, self.source.names()) if t.is_lora or t.weight.ndim == 2]
        for t in targets:
            if t.is_lora and (t.lora_b.shape[0], t.lora_a.shape[1]) != tuple(shapes[t.name]):
                raise ValueError(f"LoRA factors of {t.name} do not multiply to its weight's shape (fan_in_fan_out?)")
        if not targets:
            raise ValueError("none of the aligned weights is trained in this model (no LoRA adapter, all frozen)")
        return targets

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # W₀ of the fully trained weights: read from the run's start on disk (the module's base_dir, set
        # by on_fit_start), else copied to CPU here. LoRA updates are read from the adapters (B₀ = 0).
        # Found again: FSDP2's configure_model, after setup, replaces the parameters by sharded ones.
        self.targets = self._match(pl_module.model)
        full = [t for t in self.targets if not t.is_lora]
        self._run = RunDelta(full, start_dir=getattr(pl_module, "base_dir", None), held=self._restored)
        self._restored = None

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Every rank rewrites its replica, so all of them keep identical weights.
        self.apply(progress=trainer.is_global_zero)
        self._log(trainer)

    @torch.no_grad()
    def apply(self, progress: bool = False) -> list[str]:
        """Compare every target with its projection, rewrite the selected ones; the selected names."""
        self.similarities = {}
        for t in tqdm(self.targets, desc="SafeLoRA similarities", disable=not progress):
            C = self._projection(t)
            if C is None:
                self.similarities[t.name] = math.nan
            elif target_is_sharded(t):
                self.similarities[t.name] = self._similarity_of_rows(t, C)
            else:
                self.similarities[t.name] = layer_similarity(C, *self._update(t))
        self.selected = select_layers(self.similarities, self.threshold, self.num_layers)
        by_name = {t.name: t for t in self.targets}
        # The projection is rebuilt rather than kept: C·ΔW of every layer would hold a model's worth of memory.
        for name in tqdm(self.selected, desc="SafeLoRA rewrite", disable=not progress):
            t = by_name[name]
            if target_is_sharded(t):
                self._rewrite_rows(t, self._projection(t))
                continue
            C, (update, _) = self._projection(t), self._update(t)
            if t.is_lora:
                t.lora_b.copy_(C(update.float()))  # s·(C·B)·A = C·ΔW
            else:
                t.weight.copy_(self._run.start(name).to(t.weight.device, torch.float32) + C(update))
        return list(self.selected)

    def _projection(self, t: Target) -> SafeLoRAProjection | None:
        V = self.source.get(t.name)
        if not bool(V.any()):
            return None  # no alignment direction in this layer: nothing to compare with
        device = (t.lora_b if t.is_lora else t.weight).device
        return safelora_projection(V.to(device), self.variant, self.frac, self.eta)

    def _similarity_of_rows(self, t: Target, C: SafeLoRAProjection) -> float:
        """`layer_similarity` from this process's rows of a sharded update; every process calls it together."""
        if t.is_lora:
            shard = row_shard(t.lora_b)
            projected = C.rows(shard.local, shard.start, shard.sum_over_rows)
            return lora_cosine_of_rows(shard.local, projected, whole_factor(t.lora_a), shard.sum_over_rows)
        update, shard = run_update_rows(self._run, t.name)
        return cosine_of_rows(update, C.rows(update, shard.start, shard.sum_over_rows), shard.sum_over_rows)

    def _rewrite_rows(self, t: Target, C: SafeLoRAProjection) -> None:
        """This process's rows of B ← C·B, or of W ← W₀ + C·ΔW; every process calls it together."""
        if t.is_lora:
            shard = row_shard(t.lora_b)
            shard.local.copy_(C.rows(shard.local.float(), shard.start, shard.sum_over_rows))
            return
        update, shard = run_update_rows(self._run, t.name)
        start = rows_of(self._run.start(t.name), shard).to(update.device, torch.float32)
        shard.local.copy_(start + C.rows(update, shard.start, shard.sum_over_rows))

    def _update(self, t: Target) -> tuple[Tensor, Tensor | None]:
        """(B, A) of a LoRA pair, or (W − W₀, None) of a full weight."""
        if t.is_lora:
            return t.lora_b, t.lora_a
        return self._run.update(t.name), None

    @rank_zero_only
    def _log(self, trainer: Trainer) -> None:
        from safeproj.wandb import log_table

        finite = [s for s in self.similarities.values() if not math.isnan(s)]
        metrics = {f"safelora/similarity/{name}": s for name, s in self.similarities.items()}
        metrics["safelora/projected_layers"] = float(len(self.selected))
        metrics["safelora/total_layers"] = float(len(self.similarities))
        metrics["safelora/similarity_mean"] = sum(finite) / len(finite) if finite else math.nan
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        chosen = set(self.selected)
        rows = [
            {"name": name, "similarity": s, "projected": name in chosen, "variant": self.variant}
            for name, s in self.similarities.items()
        ]
        log_table(trainer.loggers, "safelora/layers", rows)
        rule = f"num_layers={self.num_layers}" if self.num_layers is not None else f"threshold={self.threshold}"
        rank_zero_info(
            f"SafeLoRA variant={self.variant} [{VARIANT_TEXT[self.variant]}], {rule}: projected "
            f"{len(self.selected)}/{len(self.similarities)} layers"
            + (f" ({', '.join(self.selected)})" if 0 < len(self.selected) <= 8 else "")
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            # Only the starts that are not on disk: a resumed run measures from the same W₀.
            "initial": dict(self._run.held) if self._run is not None else dict(self._restored or {}),
            "variant": self.variant,
            "similarities": dict(self.similarities),
            "selected": list(self.selected),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Runs before on_train_start: stash W₀, applied there.
        self._restored = state_dict.get("initial") or None
        self.similarities = dict(state_dict.get("similarities", {}))
        self.selected = list(state_dict.get("selected", []))
