"""How much two subspaces share: Mode Subspace Overlap (MSO) and principal angles.

Subspaces are d×k matrices with orthonormal columns, or basis Factors (which may hold the
complement of the kept subspace; the overlap is then computed without forming the kept basis).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from safeproj.core.factors import Factor
from safeproj.core.spectrum import orthogonal_complement


def _parts(Q: Tensor | Factor, what: str) -> tuple[Tensor, bool, int, int]:
    """(stored matrix in float64, is complement, d, kept dimension k)."""
    if isinstance(Q, Factor):
        M, complement, k = Q.Q, Q.complement, Q.k
    else:
        M, complement, k = Q, False, (Q.shape[1] if Q.ndim == 2 else 0)
    if M.ndim != 2:
        raise ValueError(f"{what} must be a d×k matrix, got shape {tuple(M.shape)}")
    if k < 1:
        raise ValueError(f"{what} spans no directions (k=0)")
    return M.detach().double(), complement, M.shape[0], k


def mso(Qv: Tensor | Factor, Qw: Tensor | Factor) -> float:
    """MSO(V, W) = ‖Q_Vᵀ Q_W‖_F² / min(k_V, k_W): 1 if one subspace contains the other, 0 if orthogonal."""
    V, v_comp, d, kv = _parts(Qv, "Qv")
    W, w_comp, dw, kw = _parts(Qw, "Qw")
    if d != dw:
        raise ValueError(f"subspaces live in different spaces: R^{d} and R^{dw}")
    cross = (V.T @ W).square().sum().item()
    # ‖P_V P_W‖_F² = tr(P_V P_W), expanded with P = I − U⊥U⊥ᵀ on complement sides.
    if v_comp and w_comp:
        shared = kv + kw - d + cross
    elif v_comp:
        shared = kw - cross
    elif w_comp:
        shared = kv - cross
    else:
        shared = cross
    return shared / min(kv, kw)


def random_baseline(kv: int, kw: int, d: int) -> float:
    """Expected MSO of two uniformly random subspaces of dimensions kv, kw in R^d: max(kv, kw)/d."""
    if not (1 <= kv <= d and 1 <= kw <= d):
        raise ValueError(f"need 1 <= kv, kw <= d, got kv={kv}, kw={kw}, d={d}")
    return max(kv, kw) / d


def _kept(Q: Tensor | Factor, what: str) -> Tensor:
    M, complement, _, _ = _parts(Q, what)
    return orthogonal_complement(M) if complement else M


def principal_angles(Qv: Tensor | Factor, Qw: Tensor | Factor) -> Tensor:
    """The min(k_V, k_W) principal angles in radians, ascending, in [0, π/2] (float32).

    Small angles come from sines and large ones from cosines, so both ends stay accurate.
    """
    A, B = _kept(Qv, "Qv"), _kept(Qw, "Qw")
    if A.shape[0] != B.shape[0]:
        raise ValueError(f"subspaces live in different spaces: R^{A.shape[0]} and R^{B.shape[0]}")
    if A.shape[1] > B.shape[1]:
        A, B = B, A  # A: the smaller subspace
    C = B.T @ A
    cos = torch.linalg.svdvals(C).clamp(0, 1)  # descending
    sin = torch.linalg.svdvals(A - B @ C).clamp(0, 1).flip(0)  # ascending, paired with cos
    angles = torch.where(cos > math.sqrt(0.5), torch.arcsin(sin), torch.arccos(cos))
    return angles.sort().values.float()
