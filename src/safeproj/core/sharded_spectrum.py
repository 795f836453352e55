"""Singular vectors and subspace overlaps of a matrix sharded by rows across processes, without gathering it.

Each process holds rows r0:r1 of Δ (m×n). The Gram matrix ΔᵀΔ = Σ Δ_localᵀΔ_local sums over rows, so
one n×n float64 all-reduce (8·n² bytes per tensor, whatever m) gives every process Δ's singular values
and right singular vectors; the left singular vectors' rows are then local, U_local = Δ_local·V/σ. The
m×m Gram ΔΔᵀ would be smaller when m < n, but it pairs rows held by different processes. Products of
two row-sharded bases, Q_Vᵀ Q_W, also sum over rows: one k_V×k_W all-reduce.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from safeproj.core.sharded import SumOverRows
from safeproj.core.spectrum import BLOCK, _eigh_overwrite, all_finite


def gram_of_rows(local: Tensor, sum_over_rows: SumOverRows) -> Tensor:
    """ΔᵀΔ (n×n, float64, on the rows' device) of a row-sharded Δ: every process's share, summed."""
    n = local.shape[1]
    G = torch.zeros(n, n, dtype=torch.float64, device=local.device)
    for start in range(0, local.shape[0], BLOCK):  # no float64 copy of the whole shard
        B = local[start : start + BLOCK].double()
        G.addmm_(B.T, B)
    return sum_over_rows(G)


class RowFactorization:
    """Singular values and vectors of Δ (m×n) from this process's rows of it; every process builds it together.

    `S`: the r = min(m, n) singular values (float32, descending), the same on every process.
    """

    def __init__(self, local: Tensor, rows: int, sum_over_rows: SumOverRows):
        if local.ndim != 2 or local.shape[0] > rows:
            raise ValueError(f"rows of shape {tuple(local.shape)} do not fit a {rows}-row matrix")
        self.local, self.shape = local.detach(), (rows, local.shape[1])
        G = gram_of_rows(self.local, sum_over_rows)
        if not all_finite(G):  # checked on the sum, so every process raises together
            raise ValueError("delta contains NaN or inf")
        evals, W = _eigh_overwrite(G.cpu())
        r = min(self.shape)
        self._S64 = evals.flip(0)[:r].clamp_min(0).sqrt()
        self.S = self._S64.float()
        self._W = W.flip(1)[:, :r]  # right singular vectors, descending

    def right_vectors(self) -> Tensor:
        """Δ's r right singular vectors (n×r float32), whole on every process."""
        return self._W.float()

    def left_rows(self, count: int) -> Tensor:
        """This process's rows of the top `count` left singular vectors, Δ_local·v_i/σ_i (float64)."""
        if count > 0 and self._S64[count - 1] <= 0:
            raise ValueError(f"the top {count} singular values include zeros: their left vectors are undefined")
        W = self._W[:, :count].to(self.local.device)
        S = self._S64[:count].to(self.local.device)
        return (self.local.double() @ W) / S


def cross_of_rows(a_rows: Tensor, b_rows: Tensor, sum_over_rows: SumOverRows) -> Tensor:
    """AᵀB (float64) of two row-sharded matrices from this process's rows of each: one all-reduce."""
    return sum_over_rows(a_rows.double().T @ b_rows.double())


def principal_angles_of_rows(a_rows: Tensor, b_rows: Tensor, c: Tensor, sum_over_rows: SumOverRows) -> Tensor:
    """`core.overlap.principal_angles` of two row-sharded orthonormal bases A (the smaller) and B, given C = BᵀA.

    Cosines are the singular values of C; sines those of A − B·C, taken as the square roots of the
    eigenvalues of its Gram matrix (k_A×k_A, summed over rows), so small angles stay accurate.
    """
    cos = torch.linalg.svdvals(c).clamp(0, 1)  # descending
    residual = a_rows.double() - b_rows.double() @ c
    sin = torch.linalg.eigvalsh(sum_over_rows(residual.T @ residual)).clamp(0, 1).sqrt()  # ascending
    angles = torch.where(cos > math.sqrt(0.5), torch.arcsin(sin), torch.arccos(cos))
    return angles.sort().values.float()
