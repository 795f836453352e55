"""OnlineProjection: keep a run's update inside range(P_k) or its orthogonal complement, every step."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from safeproj.callbacks._options import basis_options, check_option, misconfigured
from safeproj.core.basis import Basis
from safeproj.core.deltas import RunDelta
from safeproj.core.energy import energy_row, pool
from safeproj.core.names import parse_name
from safeproj.core.options import KEEPS, BasisSide, Keep, Selection
from safeproj.core.projector import project, project_left, project_right
from safeproj.core.sharded import (
    is_sharded,
    project_left_rows,
    project_right_rows,
    project_rows,
    project_rows_in_place,
    row_shard,
    sum_energies,
)
from safeproj.core.targets import Target, find_targets
from safeproj.model.subspaces import basis_file, expand_spec, resolve_basis
from safeproj.runs import content_sha256
from safeproj.wandb import log_table, update_config

Mode = Literal["update", "grad"]
MODES: tuple[str, ...] = get_args(Mode)


class OnlineProjection(Callback):
    """Projects every optimizer step onto P_k (keep="parallel") or P_k⊥ (keep="orthogonal").

    `on="update"` restores W ← W₀ + P(W − W₀) right after each optimizer step: exact for any optimizer,
    AdamW included (its element-wise scaling moves projected gradients out of the subspace). It keeps
    one copy of the projected weights (W₀, in the parameter's dtype and device). A resumed run takes
    its W₀ from the restored weights: they lie in W₀ + range(P), and any point of that affine subspace
    defines the same projection, so checkpoints need no copy of W₀. `on="grad"` projects gradients in
    `on_before_optimizer_step` (once per optimizer step, after accumulation and AMP unscaling, before
    clipping): exact for plain SGD, and needs no copy.

    LoRA: ΔW = s·B·A stays in range(P) when the left side projects B (P·B) and the right side projects
    A (A·Q); in update mode this needs no W₀ because B starts at zero. Both modes project the factors
    once at fit start (A starts random, and projected gradients alone would leave it so). P_k⊥ on both
    sides at once is not expressible on the factors and is refused.

    FSDP2 (weights as DTensors sharded by rows, see `SafeprojLM.configure_model`): each process keeps W₀
    for its own rows and projects its rows alone; the left side adds one all-reduce of the k×n product
    QᵀΔ per tensor and step, the right side none. No weight is gathered.

    Args:
        subspace: basis artifact, `safety:<preset>`, or a delta spec (see `safeproj.model.subspaces`).
        keep: "parallel" (P_k) or "orthogonal" (P_k⊥).
        on: "update" or "grad".
        frac, eta, selection, side, seed, include, exclude: how to build the basis from a delta
            (ignored when `subspace` is an artifact).
        log_every_n_steps: every this many optimizer steps, log `projection/removed_share` (the share of
            the step's update energy, ‖u − P·u‖²/‖u‖², that projection removed; of the gradient in grad
            mode) overall and per module type (`projection/removed_share/<type>`), and in update mode
            `projection/cumulative_share` (the run's whole update inside range(P): 1 for parallel, 0 for
            orthogonal); 0 turns it off. Each measured step holds one extra copy of the projected weights
            (update mode) while it runs.

    Logs once at fit start the table `projection/basis` (k and kept energy per tensor) and, in the W&B
    config, the basis file and its SHA-256 when `subspace` is a basis file.

    Raises:
        MisconfigurationException: on an unknown keep/on, or a basis that does not fit the model.
    """

    def __init__(
        self,
        subspace: str,
        keep: Keep = "orthogonal",
        on: Mode = "update",
        frac: float | None = None,
        eta: float | None = None,
        selection: Selection = "top",
        side: BasisSide = "left",
        seed: int = 0,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        log_every_n_steps: int = 10,
    ) -> None:
        check_option("OnlineProjection", "keep", keep, KEEPS)
        if not isinstance(log_every_n_steps, int) or log_every_n_steps < 0:
            raise MisconfigurationException(
                f"OnlineProjection log_every_n_steps={log_every_n_steps!r}: expected an integer >= 0"
            )
        self.log_every_n_steps = log_every_n_steps
        check_option("OnlineProjection", "on", on, MODES)
        self.subspace = subspace
        self.keep = keep
        self.on = on
        self.options = basis_options(
            "OnlineProjection",
            frac=frac,
            eta=eta,
            selection=selection,
            side=side,
            seed=seed,
            include=include,
            exclude=exclude,
        )
        self.basis: Basis | None = None
        self.targets: list[Target] = []
        self._initial: dict[str, torch.Tensor] = {}
        self._hook = None
        self.projected_steps = 0
        self._resumed = False
        # Diagnostics of the step being measured: weights before it, and removed / total energy per module type.
        self._measuring = False
        self._sharded = False
        self._before: dict[str, list[torch.Tensor]] = {}
        self._energy: dict[str, list[float]] = {}

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(subspace=self.subspace, keep=self.keep, on=self.on)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or self.basis is not None:
            return
        with misconfigured("OnlineProjection"):
            spec = expand_spec(self.subspace, getattr(pl_module, "model_name", None))
            self.basis = resolve_basis(spec, self.options, progress=trainer.is_global_zero)
            self.targets = find_targets(pl_module.model, self.basis)
        if self.options.side == "both" and self.keep == "orthogonal" and any(t.is_lora for t in self.targets):
            raise MisconfigurationException(
                "OnlineProjection: keep='orthogonal' with side='both' cannot be applied to LoRA factors; "
                "use side='left' or 'right'"
            )

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # configure_model (FSDP2) runs after setup and replaces the parameters: find them again.
        with misconfigured("OnlineProjection"):
            self.targets = find_targets(pl_module.model, self.basis)
        self._sharded = any(is_sharded(p) for t in self.targets for p in _tensors(t))
        for t in self.targets:
            # Factors live beside their weights, so no step copies them between devices.
            device = (t.lora_b if t.is_lora else t.weight).device
            for factor in self.basis.entries[t.name].factors().values():
                factor.Q = factor.Q.to(device)
        if self.on == "update":
            self._initial = self._start_weights(pl_module)
            if len(trainer.optimizers) != 1:
                raise MisconfigurationException(
                    f"OnlineProjection needs exactly one optimizer, found {len(trainer.optimizers)}"
                )
            self._hook = trainer.optimizers[0].register_step_post_hook(lambda *_: self._after_step())
            if not self._resumed:  # restored weights were projected when saved; again would round them anew
                # Start inside the subspace too (a LoRA B that is not zero).
                self.project_weights()
        else:
            # Projected gradients keep each factor's change in range, not its random start (LoRA's A):
            # project the factors once, so s·B·A starts, and stays, in the subspace.
            with torch.no_grad():
                for t in self.targets:
                    if t.is_lora:
                        self._project_target(t)
        n = sum((t.weight.numel() if not t.is_lora else t.lora_b.numel()) for t in self.targets)
        self._log_provenance(trainer)
        rank_zero_info(
            f"OnlineProjection: keep={self.keep} on={self.on} over {len(self.targets)} tensors "
            f"({n / 1e6:.1f}M values), basis {self.basis.nbytes() / 2**20:.1f} MiB"
        )

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        n = self.log_every_n_steps
        # Sharded energies are sums over every process's rows, so every process measures.
        self._measuring = n > 0 and trainer.global_step % n == 0 and (trainer.is_global_zero or self._sharded)
        if self._measuring and self.on == "update":
            self._before = {t.name: [_local(p).clone() for p in _tensors(t)] for t in self.targets}
        if self.on == "grad":
            self.project_grads()

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        self._before = {}  # a step the AMP scaler skipped never reached the projection: drop its snapshot
        if not self._energy:
            return
        removed = sum(e[0] for e in self._energy.values())
        total = sum(e[1] for e in self._energy.values())
        metrics = {"projection/removed_share": removed / total if total > 0 else 0.0}
        for module, (r, t) in sorted(self._energy.items()):
            metrics[f"projection/removed_share/{module}"] = r / t if t > 0 else 0.0
        self._energy = {}
        if self.on == "update":  # grad mode keeps no W₀, so its cumulative update is not at hand
            metrics["projection/cumulative_share"] = self.cumulative_share()
        if not trainer.is_global_zero:
            return
        # Straight to the loggers: `pl_module.log` would drop values on steps Lightning does not log.
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    @torch.no_grad()
    def project_grads(self) -> None:
        for t in self.targets:
            entry = self.basis.entries[t.name]
            grads = [_local(p.grad) for p in _tensors(t) if p.grad is not None]
            raw = [g.clone() for g in grads] if self._measuring else None
            if t.is_lora:
                self._project_factors(entry, t.lora_b.grad, t.lora_a.grad)
            elif is_sharded(t.weight.grad):
                shard = row_shard(t.weight.grad)
                shard.local.copy_(project_rows(shard.local, shard.start, entry, self.keep, shard.sum_over_rows))
            elif t.weight.grad is not None:
                t.weight.grad.copy_(project(t.weight.grad, entry, self.keep))
            if raw is not None:
                self._add_energy(t, raw, grads, [torch.zeros_like(g) for g in grads])
        self._measuring = False
        self.projected_steps += 1

    def _after_step(self) -> None:
        self.project_weights()
        self.projected_steps += 1

    @torch.no_grad()
    def project_weights(self) -> None:
        for t in self.targets:
            before = self._before.pop(t.name, None)
            stepped = [_local(p).clone() for p in _tensors(t)] if before is not None else None
            self._project_target(t)
            if before is not None:
                self._add_energy(t, stepped, [_local(p) for p in _tensors(t)], before)
        self._measuring = False

    @torch.no_grad()
    def cumulative_share(self) -> float:
        """‖P(W − W₀)‖² / ‖W − W₀‖² pooled over the targets: 1 for keep="parallel", 0 for "orthogonal"
        up to rounding, so it shows the projection holding (update mode; NaN before any update)."""
        rows = []
        for t in self.targets:
            entry = self.basis.entries[t.name]
            if any(is_sharded(p) for p in _tensors(t)):
                rows.append(self._sharded_energy_row(t, entry))
                continue
            update = t.delta_weight() if t.is_lora else t.weight.float() - self._initial[t.name].float()
            rows.append(energy_row(update, entry))
        return pool(rows)["share"]

    def _sharded_energy_row(self, t: Target, entry) -> dict:
        """‖PΔ‖² and ‖Δ‖² of a row-sharded weight: local rows' squares summed over the processes."""
        if t.is_lora:
            # Rows of ΔW = s·B·A: this process's rows of B times the whole of A (r×n, gathered: it is small).
            shard = row_shard(t.lora_b)
            a = t.lora_a.full_tensor() if is_sharded(t.lora_a) else t.lora_a
            update = t.scaling * (shard.local.float() @ a.detach().float())
        else:
            shard = row_shard(t.weight)
            update = shard.local.float() - self._initial[t.name].float()
        kept = project_rows(update, shard.start, entry, "parallel", shard.sum_over_rows)
        kept_sq, total = sum_energies([float(kept.square().sum()), float(update.square().sum())], update, shard.groups)
        return {"kept": kept_sq if total > 0 else 0.0, "total": total}

    def _add_energy(self, t: Target, stepped: list, projected: list, before: list) -> None:
        """Adds ‖stepped − projected‖² (removed) and ‖stepped − before‖² (the update) to `t`'s module type."""
        removed = sum(float((s.float() - p.float()).square().sum()) for s, p in zip(stepped, projected))
        update = sum(float((s.float() - b.float()).square().sum()) for s, b in zip(stepped, before))
        sharded = [p for p in _tensors(t) if is_sharded(p)]
        if sharded:  # local rows: sum over the processes that share them
            removed, update = sum_energies([removed, update], stepped[0], row_shard(sharded[0]).groups)
        totals = self._energy.setdefault(parse_name(t.name)[1], [0.0, 0.0])
        totals[0] += removed
        totals[1] += update

    def _log_provenance(self, trainer: Trainer) -> None:
        if not trainer.is_global_zero:
            return
        rows = [
            {
                "tensor": name,
                "module": parse_name(name)[1],
                "shape": "x".join(map(str, e.shape)),
                "k_left": e.left.k if e.left is not None else None,
                "k_right": e.right.k if e.right is not None else None,
                "energy_kept": float(e.energy_kept),
            }
            for name, e in sorted(self.basis.entries.items())
        ]
        log_table(trainer.loggers, "projection/basis", rows)
        path = basis_file(self.basis)  # the artifact named, or the cache entry built from a delta spec
        if path is not None and Path(path).is_file():
            update_config(
                trainer.loggers, {"projection.basis_file": path, "projection.basis_sha256": content_sha256(path)}
            )

    def _project_target(self, t: Target) -> None:
        entry = self.basis.entries[t.name]
        if t.is_lora:
            self._project_factors(entry, t.lora_b, t.lora_a)
        elif is_sharded(t.weight):
            self._project_shard(t.weight, self._initial[t.name], entry)
        elif t.weight.dtype == torch.float32 and t.weight.ndim == 2 and (entry.left is None) != (entry.right is None):
            self._project_in_place(t.weight, self._initial[t.name], entry)
        else:
            w0 = self._initial[t.name]
            delta = project(t.weight.float() - w0.float(), entry, self.keep)
            t.weight.copy_(w0.float() + delta)

    def _project_in_place(self, w: torch.Tensor, w0: torch.Tensor, entry) -> None:
        """W ← W₀ + P(W − W₀) for one stored side, with one temporary: the step is memory-bound.

        The factor Q spans either the kept subspace or its complement; either way W₀ + P·D is
        W − QQᵀD (when QQᵀD is the part to drop) or W₀ + QQᵀD (when it is the part to keep).
        """
        left = entry.left is not None
        factor = entry.left if left else entry.right
        Q = factor.Q
        delta = w - w0
        drop = (self.keep == "orthogonal") != factor.complement
        if not drop:
            w.copy_(w0)
        if left:
            w.addmm_(Q, Q.T @ delta, alpha=-1.0 if drop else 1.0)
        else:
            w.addmm_(delta @ Q, Q.T, alpha=-1.0 if drop else 1.0)

    def _project_shard(self, w: torch.Tensor, w0: torch.Tensor, entry) -> None:
        """W ← W₀ + P(W − W₀) on this process's rows of a row-sharded weight (W₀ holds the same rows)."""
        shard = row_shard(w)
        local = shard.local
        if local.dtype == torch.float32 and (entry.left is None) != (entry.right is None):
            project_rows_in_place(local, w0, shard.start, entry, self.keep, shard.sum_over_rows)
        else:
            delta = project_rows(local.float() - w0.float(), shard.start, entry, self.keep, shard.sum_over_rows)
            local.copy_(w0.float() + delta)

    def _project_factors(self, entry, b: torch.Tensor | None, a: torch.Tensor | None) -> None:
        if entry.left is not None and b is not None:
            if is_sharded(b):  # B (out×r) sharded by rows: the left side sums over them
                shard = row_shard(b)
                shard.local.copy_(
                    project_left_rows(shard.local, shard.start, entry.left, self.keep, shard.sum_over_rows)
                )
            else:
                b.copy_(project_left(b, entry.left, self.keep))
        if entry.right is not None and a is not None:
            if is_sharded(a):  # A (r×in) sharded by rows: the right side acts on each row alone
                shard = row_shard(a)
                shard.local.copy_(project_right_rows(shard.local, entry.right, self.keep))
            else:
                a.copy_(project_right(a, entry.right, self.keep))

    def _start_weights(self, pl_module: LightningModule) -> dict[str, torch.Tensor]:
        """W₀ of the plain targets, on their devices. A fresh run takes the weights as they are. A resumed
        run reads them from the run's start on disk where it has them (SafeprojLM's `base_dir`), so its
        steps equal the uninterrupted run's bit for bit; elsewhere the restored weights serve: they lie in
        W₀ + range(P), and every point of it defines the same projection up to rounding."""
        plain = [t for t in self.targets if not t.is_lora]
        if not self._resumed:
            return {t.name: _local(t.weight).clone() for t in plain}
        run = RunDelta(plain, getattr(pl_module, "base_dir", None))
        return {t.name: _local_rows(run.start(t.name), t.weight) for t in plain}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"projected_steps": self.projected_steps, "keep": self.keep, "on": self.on}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks before on_fit_start: this run continues a checkpoint.
        self.projected_steps = int(state_dict.get("projected_steps", 0))
        self._resumed = True


def _local(p: torch.Tensor) -> torch.Tensor:
    """This process's part of a parameter or gradient (its rows under FSDP2), detached."""
    return (row_shard(p).local if is_sharded(p) else p).detach()


def _local_rows(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A copy of the rows of `full` that this process holds of `like`, on its device and in its dtype."""
    if is_sharded(like):
        shard = row_shard(like)
        full = full[shard.start : shard.start + shard.local.shape[0]]
    return full.to(device=like.device, dtype=like.dtype, copy=True)


def _tensors(t: Target) -> list[torch.Tensor]:
    """The parameters projection changes for a target: its weight, or its LoRA factors."""
    return [p for p in (t.lora_b, t.lora_a) if p is not None] if t.is_lora else [t.weight]
