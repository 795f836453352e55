"""Projections of a weight sharded by rows across processes (FSDP2's DTensor, `Shard(0)`), without gathering it.

Each process holds rows r0:r1 of an m×n tensor and the whole small factor Q (m×k left, n×k right). The
left side Q(QᵀΔ) sums over rows: each process forms its rows' share Q[r0:r1]ᵀΔ_local (k×n), one
all-reduce sums the shares, and each process keeps its own rows Q[r0:r1](QᵀΔ). The right side ΔQQᵀ
acts on each row alone, so it needs no communication. Ranks whose shard is empty still join the
all-reduce (with zeros), so every rank issues the same collectives in the same order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from safeproj.core.factors import BasisEntry, Factor
from safeproj.core.options import KEEPS
from safeproj.core.projector import random_share
from safeproj.core.spectrum import squared_norm

SumOverRows = Callable[[Tensor], Tensor]
"""Sums a k×n tensor over every process that holds part of the rows (in place), and returns it."""


@dataclass(frozen=True)
class RowShard:
    """This process's rows of a row-sharded 2-D tensor and how to sum over the processes sharing them."""

    local: Tensor
    start: int
    rows: int
    groups: tuple[dist.ProcessGroup, ...]

    def sum_over_rows(self, x: Tensor) -> Tensor:
        # Sum over several Shard(0) mesh dimensions is one sum per dimension; Replicate dimensions hold
        # the same rows already and are left out.
        for group in self.groups:
            dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x


def is_sharded(x: Tensor) -> bool:
    return isinstance(x, DTensor)


def forward_needs_every_process(module: torch.nn.Module) -> bool:
    """Whether a module's forward is a collective: FSDP2 gathers its sharded weights from every process."""
    return dist.is_initialized() and dist.get_world_size() > 1 and any(is_sharded(p) for p in module.parameters())


def local_part(p: Tensor) -> Tensor:
    """This process's part of a parameter or gradient (its rows under FSDP2; the whole tensor otherwise),
    detached: a view, so writes reach the parameter."""
    return (row_shard(p).local if is_sharded(p) else p).detach()


def row_shard(x: DTensor) -> RowShard:
    """The local rows of `x` (a 2-D DTensor sharded on dim 0 and/or replicated) with their global offset."""
    if x.ndim != 2:
        raise ValueError(f"sharded projection needs a 2-D tensor, got shape {tuple(x.shape)}")
    dims = []
    for mesh_dim, placement in enumerate(x.placements):
        if type(placement) is Shard and placement.dim == 0:  # a strided shard's rows are not contiguous
            dims.append(mesh_dim)
        elif not isinstance(placement, Replicate):
            raise ValueError(
                f"sharded projection needs rows sharded (Shard(0)) or replicated, got placements {x.placements}"
            )
    shape, offset = compute_local_shape_and_global_offset(x.shape, x.device_mesh, x.placements)
    local = x.to_local()
    if tuple(local.shape) != tuple(shape):  # FSDP2 pads dim 0 in its buffers; the local view must not be padded
        raise ValueError(f"local shard of shape {tuple(local.shape)}, expected {tuple(shape)}")
    groups = tuple(x.device_mesh.get_group(d) for d in dims)
    return RowShard(local=local, start=int(offset[0]), rows=int(x.shape[0]), groups=groups)


def _check(local: Tensor, start: int, entry: BasisEntry, keep: str) -> None:
    _check_keep(keep)
    if local.ndim != 2:
        raise ValueError(f"expected a 2-D row shard, got shape {tuple(local.shape)}")
    m, n = entry.shape[0], entry.shape[1] if len(entry.shape) == 2 else 1
    if local.shape[1] != n or not 0 <= start <= start + local.shape[0] <= m:
        raise ValueError(
            f"rows {start}:{start + local.shape[0]} of width {local.shape[1]} do not fit basis entry "
            f"{entry.name!r} {tuple(entry.shape)}"
        )


def _check_keep(keep: str) -> None:
    if keep not in KEEPS:
        raise ValueError(f"unknown keep {keep!r}; expected one of {', '.join(KEEPS)}")


def _left_rows(x: Tensor, factor: Factor, start: int, sum_over_rows: SumOverRows) -> Tensor:
    """Rows of QQᵀX for float32 rows x of X: one k×n all-reduce."""
    Q = factor.Q.to(device=x.device, dtype=x.dtype)
    rows = Q[start : start + x.shape[0]]
    return rows @ sum_over_rows(rows.T @ x)


def _right_rows(x: Tensor, factor: Factor) -> Tensor:
    Q = factor.Q.to(device=x.device, dtype=x.dtype)
    return (x @ Q) @ Q.T


def project_left_rows(local: Tensor, start: int, factor: Factor, keep: str, sum_over_rows: SumOverRows) -> Tensor:
    """Rows start:start+len(local) of P·X or P⊥·X, X (factor.dim rows) sharded by rows: a weight or LoRA B."""
    _check_keep(keep)
    if local.ndim != 2 or not 0 <= start <= start + local.shape[0] <= factor.dim:
        raise ValueError(f"rows {start}:{start + local.shape[0]} do not fit a subspace of R^{factor.dim}")
    x = local.float()
    QQx = _left_rows(x, factor, start, sum_over_rows)
    kept = QQx if (keep == "parallel") != factor.complement else x - QQx
    return kept.to(local.dtype)


def project_right_rows(local: Tensor, factor: Factor, keep: str) -> Tensor:
    """Local rows of X·P or X·P⊥ (row-local, no communication): a weight or LoRA A."""
    _check_keep(keep)
    if local.ndim != 2 or local.shape[1] != factor.dim:
        raise ValueError(f"rows of width {tuple(local.shape)[1:]} do not fit a subspace of R^{factor.dim}")
    x = local.float()
    xQQ = _right_rows(x, factor)
    kept = xQQ if (keep == "parallel") != factor.complement else x - xQQ
    return kept.to(local.dtype)


def project_rows(local: Tensor, start: int, entry: BasisEntry, keep: str, sum_over_rows: SumOverRows) -> Tensor:
    """Rows start:start+len(local) of P_L·X·P_R (keep="parallel") or of X − P_L·X·P_R, X being row-sharded.

    Every process sharing X's rows must call this together (the left side all-reduces a k×n product).
    """
    _check(local, start, entry, keep)
    if entry.left is None and entry.right is None:
        raise ValueError(f"basis entry {entry.name!r} has no factor")
    x = local.float()
    kept = x
    if entry.right is not None:
        kept = project_right_rows(kept, entry.right, "parallel")
    if entry.left is not None:
        kept = project_left_rows(kept, start, entry.left, "parallel", sum_over_rows)
    out = kept if keep == "parallel" else x - kept
    return out.to(local.dtype)


def project_shard(x: DTensor, entry: BasisEntry, keep: str = "parallel") -> Tensor:
    """This process's rows of P·X or P⊥·X for a row-sharded DTensor X, as a plain local tensor."""
    shard = row_shard(x)
    return project_rows(shard.local, shard.start, entry, keep, shard.sum_over_rows)


@torch.no_grad()
def project_rows_in_place(
    w: Tensor, w0: Tensor, start: int, entry: BasisEntry, keep: str, sum_over_rows: SumOverRows
) -> None:
    """w ← w0 + P(w − w0) on local rows, one float32 weight and one stored side: one temporary of w's size.

    Q spans the kept subspace or its complement; QQᵀD is then the part to keep or the part to drop.
    """
    _check(w, start, entry, keep)
    factor = entry.left if entry.left is not None else entry.right
    if factor is None or (entry.left is not None and entry.right is not None):
        raise ValueError(f"in-place projection needs exactly one side, basis entry {entry.name!r} has two or none")
    Q = factor.Q
    delta = w - w0
    drop = (keep == "orthogonal") != factor.complement
    if not drop:
        w.copy_(w0)
    if entry.left is not None:
        rows = Q[start : start + w.shape[0]]
        w.addmm_(rows, sum_over_rows(rows.T @ delta), alpha=-1.0 if drop else 1.0)
    else:
        w.addmm_(delta @ Q, Q.T, alpha=-1.0 if drop else 1.0)


def sum_energies(values: list[float], like: Tensor, groups: tuple[dist.ProcessGroup, ...]) -> list[float]:
    """Sums a few per-process numbers (squared norms of local rows) over the row-sharing processes."""
    t = torch.tensor(values, dtype=torch.float64, device=like.device)
    for group in groups:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t.tolist()


def rows_of(full: Tensor, shard: RowShard) -> Tensor:
    """The rows of `full` that `shard` holds: sliced from a whole tensor, or the local part of a DTensor laid
    out like the shard's tensor (a start copied from the sharded weight), read without communication."""
    if is_sharded(full):
        own = row_shard(full)
        if (own.start, own.local.shape[0]) != (shard.start, shard.local.shape[0]):
            raise ValueError(f"rows {own.start}:+{own.local.shape[0]} do not fit a shard of rows {shard.start}:")
        return own.local
    if full.shape[0] != shard.rows:
        raise ValueError(f"a tensor of {full.shape[0]} rows does not fit a shard of a {shard.rows}-row tensor")
    return full[shard.start : shard.start + shard.local.shape[0]]


def squared_norms(parts: list[Tensor], groups: tuple[dist.ProcessGroup, ...]) -> list[float]:
    """‖X‖_F² of each row-sharded X from this process's rows of it: one small all-reduce for all of them."""
    return sum_energies([squared_norm(p) for p in parts], parts[0], groups)


def energy_of_rows(update: Tensor, shard: RowShard, entry: BasisEntry) -> dict:
    """`core.energy.energy_row` of a row-sharded update from this process's rows of it (those `shard` holds):
    ‖PΔ‖², ‖Δ‖², their share and a random subspace's share, summed over the processes."""
    x = update.float()
    kept_rows = project_rows(x, shard.start, entry, "parallel", shard.sum_over_rows)
    kept, total = squared_norms([kept_rows, x], shard.groups)
    share = kept / total if total > 0 else math.nan
    return {"kept": kept if total > 0 else 0.0, "total": total, "share": share, "random_share": random_share(entry)}


def lora_update_rows(b: Tensor, a: Tensor, scaling: float) -> tuple[Tensor, RowShard]:
    """This process's rows of s·B·A for B (m×r) sharded by rows, and B's shard. A (r×n) is a small factor:
    gathered whole when sharded, as every row of the product needs all of it."""
    shard = row_shard(b)
    return scaling * (shard.local.detach().float() @ whole_factor(a).detach().float()), shard


def whole_factor(x: Tensor) -> Tensor:
    """A small LoRA factor A (r×n) whole: gathered when sharded, as every row of B·A needs all of it."""
    return x.full_tensor() if is_sharded(x) else x


def whole_rows(x: Tensor) -> RowShard:
    """A plain tensor every process holds whole, as a shard of all its rows that sums over no process."""
    return RowShard(local=x, start=0, rows=int(x.shape[0]), groups=())


def run_update_rows(run, name: str) -> tuple[Tensor, RowShard]:
    """This process's rows of a RunDelta's update W_now − W_start (float32) and the shard they come from.

    A plain weight's start rows come from disk or the run's copy (`rows_of`); a LoRA pair's update is
    s·B·A − s·B₀·A₀ on B's rows, with the small factors A and A₀ gathered whole. A weight that is not a
    DTensor is one shard of all its rows.
    """
    t = run.targets[name]
    if t.is_lora:
        rows, shard = (
            lora_update_rows(t.lora_b, t.lora_a, t.scaling)
            if is_sharded(t.lora_b)
            else (t.delta_weight().detach(), whole_rows(t.lora_b))
        )
        if f"{name}::B" in run.held:
            b0 = rows_of(run.held[f"{name}::B"], shard).to(rows.device).float()
            a0 = whole_factor(run.held[f"{name}::A"]).to(rows.device).float()
            rows = rows - t.scaling * (b0 @ a0)
        return rows, shard
    shard = row_shard(t.weight) if is_sharded(t.weight) else whole_rows(t.weight.detach())
    start = rows_of(run.start(name), shard).to(shard.local.device).float()
    return shard.local.detach().float() - start, shard


@contextmanager
def root_gathered(model: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """The FSDP2 root unit's own weights (embeddings, final norm, head) gathered for the block; a no-op
    for a model that is not an FSDP2 module. Every process must enter it together.

    FSDP2 gathers them in the root's forward, which a call to the inner decoder skips. FSDP2 also takes
    the first unit to run a forward as its root: a decoder block entered before the root ever ran would
    become a root of its own and break the next training step, so one token goes through the root first.
    Call under no_grad.
    """
    if not isinstance(model, FSDPModule):
        yield
        return
    model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device), use_cache=False)
    model.unshard()
    try:
        yield
    finally:
        model.reshard()
