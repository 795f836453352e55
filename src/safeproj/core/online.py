"""Projection of a run's weights (or gradients) after every step, whole or as FSDP2 row shards.

`StepProjector` holds what online projection needs per tensor: the basis entry, W₀ (this process's rows
of it under FSDP2) and the energies of measured steps. W ← W₀ + P(W − W₀) (update mode) or g ← P·g (grad
mode); LoRA pairs project B on the left and A on the right. Sharded tensors go through `core.sharded`:
one k×n all-reduce per left-side tensor, no gather.
"""

from __future__ import annotations

import torch
from torch import Tensor

from safeproj.core.basis import Basis
from safeproj.core.deltas import RunDelta
from safeproj.core.energy import energy_row, pool
from safeproj.core.names import parse_name
from safeproj.core.projector import project, project_left, project_right
from safeproj.core.sharded import (
    energy_of_rows,
    is_sharded,
    local_part,
    lora_update_rows,
    project_left_rows,
    project_right_rows,
    project_rows,
    project_rows_in_place,
    row_shard,
    rows_of,
    sum_energies,
)
from safeproj.core.targets import Target


class StepProjector:
    """Projects `targets` onto range(P) (keep="parallel") or its complement, and measures what it removed.

    Every process sharing a row-sharded tensor must make the same calls in the same order (the left
    side and the energies of sharded tensors are all-reduced).
    """

    def __init__(self, basis: Basis, keep: str, targets: list[Target]) -> None:
        self.basis = basis
        self.keep = keep
        self.targets = targets
        self.sharded = any(is_sharded(p) for t in targets for p in tensors_of(t))
        self.initial: dict[str, Tensor] = {}
        self._before: dict[str, list[Tensor]] = {}
        self._energy: dict[str, list[float]] = {}

    def move_factors_to_targets(self) -> None:
        """Factors live beside their weights, so no step copies them between devices."""
        for t in self.targets:
            device = (t.lora_b if t.is_lora else t.weight).device
            for factor in self.basis.entries[t.name].factors().values():
                factor.Q = factor.Q.to(device)

    def keep_start(self, resumed: bool, start_dir: str | None) -> None:
        """W₀ of the plain targets, on their devices. A fresh run takes the weights as they are. A resumed
        run reads them from the run's start on disk where it has them (`start_dir`), so its steps equal
        the uninterrupted run's bit for bit; elsewhere the restored weights serve: they lie in
        W₀ + range(P), and every point of it defines the same projection up to rounding."""
        plain = [t for t in self.targets if not t.is_lora]
        if not resumed:
            self.initial = {t.name: local_part(t.weight).clone() for t in plain}
            return
        run = RunDelta(plain, start_dir)
        self.initial = {t.name: _local_rows(run.start(t.name), t.weight) for t in plain}

    def snapshot(self) -> None:
        """Keeps this process's part of every target, to measure the coming optimizer step (update mode)."""
        self._before = {t.name: [local_part(p).clone() for p in tensors_of(t)] for t in self.targets}

    def drop_snapshot(self) -> None:
        """Forgets a snapshot whose step never reached the projection (skipped by the AMP scaler)."""
        self._before = {}

    @torch.no_grad()
    def project_weights(self) -> None:
        """W ← W₀ + P(W − W₀) for every target; measures the step when a snapshot was taken before it."""
        for t in self.targets:
            before = self._before.pop(t.name, None)
            stepped = [local_part(p).clone() for p in tensors_of(t)] if before is not None else None
            self.project_target(t)
            if before is not None:
                self._add_energy(t, stepped, [local_part(p) for p in tensors_of(t)], before)

    @torch.no_grad()
    def project_grads(self, measure: bool) -> None:
        """g ← P·g for every target's gradient (LoRA: B's on the left, A's on the right)."""
        for t in self.targets:
            entry = self.basis.entries[t.name]
            grads = [local_part(p.grad) for p in tensors_of(t) if p.grad is not None]
            raw = [g.clone() for g in grads] if measure else None
            if t.is_lora:
                self._project_factors(entry, t.lora_b.grad, t.lora_a.grad)
            elif is_sharded(t.weight.grad):
                shard = row_shard(t.weight.grad)
                shard.local.copy_(project_rows(shard.local, shard.start, entry, self.keep, shard.sum_over_rows))
            elif t.weight.grad is not None:
                t.weight.grad.copy_(project(t.weight.grad, entry, self.keep))
            if raw is not None:
                self._add_energy(t, raw, grads, [torch.zeros_like(g) for g in grads])

    @torch.no_grad()
    def project_lora_factors(self) -> None:
        """Projects the LoRA factors themselves, so s·B·A starts in the subspace (A starts random)."""
        for t in self.targets:
            if t.is_lora:
                self.project_target(t)

    @torch.no_grad()
    def project_target(self, t: Target) -> None:
        entry = self.basis.entries[t.name]
        if t.is_lora:
            self._project_factors(entry, t.lora_b, t.lora_a)
        elif is_sharded(t.weight):
            self._project_shard(t.weight, self.initial[t.name], entry)
        elif t.weight.dtype == torch.float32 and t.weight.ndim == 2 and (entry.left is None) != (entry.right is None):
            self._project_in_place(t.weight, self.initial[t.name], entry)
        else:
            w0 = self.initial[t.name]
            delta = project(t.weight.float() - w0.float(), entry, self.keep)
            t.weight.copy_(w0.float() + delta)

    def take_removed_shares(self) -> tuple[float, dict[str, float]] | None:
        """The measured step's removed share ‖u − P·u‖²/‖u‖², overall and per module type, then forgets
        it; None when no step was measured since the last call."""
        if not self._energy:
            return None
        removed = sum(e[0] for e in self._energy.values())
        total = sum(e[1] for e in self._energy.values())
        per_module = {module: r / t if t > 0 else 0.0 for module, (r, t) in sorted(self._energy.items())}
        self._energy = {}
        return (removed / total if total > 0 else 0.0), per_module

    @torch.no_grad()
    def cumulative_share(self) -> float:
        """‖P(W − W₀)‖² / ‖W − W₀‖² pooled over the targets: 1 for keep="parallel", 0 for "orthogonal"
        up to rounding, so it shows the projection holding (update mode; NaN before any update)."""
        rows = []
        for t in self.targets:
            entry = self.basis.entries[t.name]
            if any(is_sharded(p) for p in tensors_of(t)):
                rows.append(self._sharded_energy_row(t, entry))
                continue
            update = t.delta_weight() if t.is_lora else t.weight.float() - self.initial[t.name].float()
            rows.append(energy_row(update, entry))
        return pool(rows)["share"]

    def _sharded_energy_row(self, t: Target, entry) -> dict:
        """‖PΔ‖² and ‖Δ‖² of a row-sharded weight or LoRA pair: local rows' squares summed over the processes."""
        if t.is_lora:
            update, shard = lora_update_rows(t.lora_b, t.lora_a, t.scaling)
        else:
            shard = row_shard(t.weight)
            update = shard.local.float() - self.initial[t.name].float()
        row = energy_of_rows(update, shard, entry)
        return {"kept": row["kept"], "total": row["total"]}

    def _add_energy(self, t: Target, stepped: list, projected: list, before: list) -> None:
        """Adds ‖stepped − projected‖² (removed) and ‖stepped − before‖² (the update) to `t`'s module type."""
        removed = sum(float((s.float() - p.float()).square().sum()) for s, p in zip(stepped, projected))
        update = sum(float((s.float() - b.float()).square().sum()) for s, b in zip(stepped, before))
        sharded = [p for p in tensors_of(t) if is_sharded(p)]
        if sharded:  # local rows: sum over the processes that share them
            removed, update = sum_energies([removed, update], stepped[0], row_shard(sharded[0]).groups)
        totals = self._energy.setdefault(parse_name(t.name)[1], [0.0, 0.0])
        totals[0] += removed
        totals[1] += update

    def _project_in_place(self, w: Tensor, w0: Tensor, entry) -> None:
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

    def _project_shard(self, w: Tensor, w0: Tensor, entry) -> None:
        """W ← W₀ + P(W − W₀) on this process's rows of a row-sharded weight (W₀ holds the same rows)."""
        shard = row_shard(w)
        local = shard.local
        if local.dtype == torch.float32 and (entry.left is None) != (entry.right is None):
            project_rows_in_place(local, w0, shard.start, entry, self.keep, shard.sum_over_rows)
        else:
            delta = project_rows(local.float() - w0.float(), shard.start, entry, self.keep, shard.sum_over_rows)
            local.copy_(w0.float() + delta)

    def _project_factors(self, entry, b: Tensor | None, a: Tensor | None) -> None:
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


def tensors_of(t: Target) -> list[Tensor]:
    """The parameters projection changes for a target: its weight, or its LoRA factors."""
    return [p for p in (t.lora_b, t.lora_a) if p is not None] if t.is_lora else [t.weight]


def _local_rows(full: Tensor, like: Tensor) -> Tensor:
    """A copy of the rows of `full` that this process holds of `like`, on its device and in its dtype.

    `full` is itself sharded like `like` where no start file held it (a copy of the restored weights)."""
    part = rows_of(full, row_shard(like)) if is_sharded(like) else local_part(full)
    return part.to(device=like.device, dtype=like.dtype, copy=True)
