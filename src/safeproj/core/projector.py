"""Projections onto a basis entry's kept subspace (P) or its orthogonal complement (P⊥ = I − P).

Math in float32, results cast back to the input's dtype. A factor holds either the kept
directions U (P·x = U(Uᵀx)) or a basis U⊥ of the complement (P·x = x − U⊥(U⊥ᵀx)), so the cost is
proportional to min(k, d − k). 1-D inputs are read as column vectors (m×1).
"""

from __future__ import annotations

from torch import Tensor

from safeproj.core.factors import BasisEntry, Factor
from safeproj.core.options import KEEPS
from safeproj.core.spectrum import squared_norm


def _check_keep(keep: str) -> None:
    if keep not in KEEPS:
        raise ValueError(f"unknown keep {keep!r}; expected one of {', '.join(KEEPS)}")


def _as_2d(X: Tensor) -> Tensor:
    if X.ndim == 1:
        return X.reshape(-1, 1)
    if X.ndim != 2:
        raise ValueError(f"expected a 1-D or 2-D tensor, got shape {tuple(X.shape)}")
    return X


def _left(x: Tensor, factor: Factor, parallel: bool) -> Tensor:
    """P·x or P⊥·x for float32 x (d×c)."""
    Q = factor.Q.to(device=x.device, dtype=x.dtype)
    QQx = Q @ (Q.T @ x)
    # QQᵀx is the kept part when Q holds the kept directions, the discarded part otherwise.
    return QQx if parallel != factor.complement else x - QQx


def _right(x: Tensor, factor: Factor, parallel: bool) -> Tensor:
    """x·P or x·P⊥ for float32 x (c×d)."""
    Q = factor.Q.to(device=x.device, dtype=x.dtype)
    xQQ = (x @ Q) @ Q.T
    return xQQ if parallel != factor.complement else x - xQQ


def project_left(X: Tensor, factor: Factor, keep: str = "parallel") -> Tensor:
    """P·X (keep="parallel") or P⊥·X; X has factor.dim rows (a full weight or LoRA B)."""
    _check_keep(keep)
    x = _as_2d(X)
    if x.shape[0] != factor.dim:
        raise ValueError(f"project_left: X has {x.shape[0]} rows, the subspace lives in R^{factor.dim}")
    return _left(x.float(), factor, keep == "parallel").to(X.dtype).reshape(X.shape)


def project_right(X: Tensor, factor: Factor, keep: str = "parallel") -> Tensor:
    """X·P (keep="parallel") or X·P⊥; X has factor.dim columns (a full weight or LoRA A)."""
    _check_keep(keep)
    x = _as_2d(X)
    if x.shape[1] != factor.dim:
        raise ValueError(f"project_right: X has {x.shape[1]} columns, the subspace lives in R^{factor.dim}")
    return _right(x.float(), factor, keep == "parallel").to(X.dtype).reshape(X.shape)


def _parallel(x: Tensor, entry: BasisEntry) -> Tensor:
    """P_L·x·P_R for float32 x, with missing sides left out."""
    if entry.left is None and entry.right is None:
        raise ValueError(f"basis entry {entry.name!r} has no factor")
    if entry.left is not None:
        x = _left(x, entry.left, True)
    if entry.right is not None:
        x = _right(x, entry.right, True)
    return x


def _entry_input(X: Tensor, entry: BasisEntry) -> Tensor:
    x = _as_2d(X)
    want = (entry.shape[0], entry.shape[1] if len(entry.shape) == 2 else 1)
    if tuple(x.shape) != want:
        raise ValueError(
            f"tensor of shape {tuple(X.shape)} does not fit basis entry {entry.name!r} {tuple(entry.shape)}"
        )
    return x.float()


def project(X: Tensor, entry: BasisEntry, keep: str = "parallel") -> Tensor:
    """P_L·X·P_R (keep="parallel") or X − P_L·X·P_R (keep="orthogonal") over the entry's sides.

    With one side this is P·X / P⊥·X (left) or X·P / X·P⊥ (right).
    """
    _check_keep(keep)
    x = _entry_input(X, entry)
    kept = _parallel(x, entry)
    out = kept if keep == "parallel" else x - kept
    return out.to(X.dtype).reshape(X.shape)


def energy_share(X: Tensor, entry: BasisEntry) -> float:
    """‖P_L·X·P_R‖_F² / ‖X‖_F²: the share of X's energy inside the kept subspace."""
    x = _entry_input(X, entry)
    total = squared_norm(x)
    if total == 0:
        raise ValueError(f"energy share of a zero tensor is undefined ({entry.name!r})")
    factors = entry.factors()
    if len(factors) == 1:  # ‖QQᵀx‖ = ‖Qᵀx‖: no full-size projection needed
        ((side, f),) = factors.items()
        Q = f.Q.to(device=x.device, dtype=x.dtype)
        inside = sum(  # a few directions at a time: no k×n product held whole
            squared_norm(Q[:, j : j + 64].T @ x if side == "left" else x @ Q[:, j : j + 64])
            for j in range(0, Q.shape[1], 64)
        )
        return (max(total - inside, 0.0) if f.complement else inside) / total
    return squared_norm(_parallel(x, entry)) / total


def random_share(entry: BasisEntry) -> float:
    """Expected energy share of a random direction: (k_L/m)·(k_R/n), a missing side counting 1."""
    share = 1.0
    for f in (entry.left, entry.right):
        if f is not None:
            share *= f.k / f.dim
    return share
