"""Per-tensor singular spectra, the choice of k, and the kept singular directions.

Every subspace in safeproj comes from here: projection bases, MSO and energy diagnostics share one
factorization path. A tensor is read as a matrix Δ (m×n); a 1-D tensor of length m is the m×1
matrix, so its left subspace is the span of the vector.

Two exact factorizations are offered:
- "svd": `torch.linalg.svd` in float32.
- "gram": the eigendecomposition of the smaller Gram matrix (ΔΔᵀ or ΔᵀΔ) in float64, the other
  side recovered as ΔV/σ and its null directions completed by Householder reflections. Squaring
  the matrix halves the accurate digits, so the Gram path works in float64; it then matches or
  beats the float32 SVD, and is faster: benchmarks/overlap.py (CPU, one thread) measured the
  vectors of the smaller side 1.8x faster at 2048², 2.0x at 4096², 6.0x at 2048×8192 and 4.7x at
  4096×11008, and the values alone (`energy_spectrum`) 2.5-7.3x faster than the SVD, with energy
  curves equal to 2e-6 relative.
  Memory: Δ is converted to float64 in blocks of rows (no float64 copy of a whole Δ), the
  eigendecomposition overwrites the Gram matrix and needs O(r) workspace (LAPACK's syevr), the
  other side is recovered only for the columns asked for, and given a function that re-reads Δ,
  Δ is let go during the eigendecomposition. On SmolLM2-135M this brought the basis build's
  transient memory from 3.2x to 1.1x the largest (tuned, base) tensor pair
  (benchmarks/projection.py).
"auto" takes the Gram path.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable

import scipy.linalg
import torch
from torch import Tensor

from safeproj.core.options import SELECTIONS, SIDES, check_choice, check_fraction, check_seed

METHODS = ("auto", "svd", "gram")
AUTO_METHOD = "gram"  # as fast or faster than the SVD on every measured shape, and more accurate
FP32_EPS = torch.finfo(torch.float32).eps


def as_matrix(delta: Tensor) -> Tensor:
    """`delta` as a float32 matrix; a 1-D tensor of length m becomes m×1."""
    if delta.ndim == 1:
        return delta.reshape(-1, 1).float()
    if delta.ndim != 2:
        raise ValueError(f"expected a 1-D or 2-D tensor, got shape {tuple(delta.shape)}")
    return delta.float()


def _complete(Y: Tensor, cols: int) -> Tensor:
    """`cols` orthonormal columns orthogonal to span(Y) (Y: d×p with orthonormal columns).

    Uses the Householder reflectors of Y's QR: columns p..p+cols of the full Q, without forming
    the d×d matrix.
    """
    d, p = Y.shape
    pick = torch.zeros(d, cols, dtype=Y.dtype, device=Y.device)
    pick[torch.arange(p, p + cols), torch.arange(cols)] = 1.0
    if p == 0:
        return pick
    reflectors, tau = torch.geqrf(Y)
    return torch.ormqr(reflectors, tau, pick)


def orthogonal_complement(Qk: Tensor) -> Tensor:
    """Orthonormal basis (d×(d−k)) of the orthogonal complement of span(Qk) (Qk: d×k orthonormal)."""
    if Qk.ndim != 2 or Qk.shape[1] > Qk.shape[0]:
        raise ValueError(f"expected a d×k matrix with k <= d, got shape {tuple(Qk.shape)}")
    d, k = Qk.shape
    return _complete(Qk.double(), d - k).to(Qk.dtype)


BLOCK = 128  # rows (or columns) converted to float64 at a time: no float64 copy of a whole Δ


def _row_blocks(X: Tensor):
    for start in range(0, X.shape[0], BLOCK):
        yield start, X[start : start + BLOCK].double()


def _gram64(M: Tensor, wide: bool) -> Tensor:
    """ΔΔᵀ (wide) or ΔᵀΔ in float64, accumulated over blocks of Δ."""
    X = M.T if wide else M  # the Gram matrix is XᵀX, summed over row blocks of X
    G = torch.zeros(X.shape[1], X.shape[1], dtype=torch.float64)
    for _, B in _row_blocks(X):
        G.addmm_(B.T, B)
    return G


CHUNK = 1 << 16  # fewest elements per chunk for element-wise sums


def _chunks(M: Tensor):
    """At most 16 pieces of M's elements (and no fewer than CHUNK each): small temporaries, few steps."""
    flat = M.reshape(-1)
    size = max(CHUNK, -(-flat.numel() // 16))
    return (flat[i : i + size] for i in range(0, flat.numel(), size))


def all_finite(M: Tensor) -> bool:
    """No NaN or inf in M: its min and max are finite (NaN propagates through both). One pass and
    no full-size temporary, where torch.isfinite builds |M| first."""
    return M.numel() == 0 or all(bool(torch.isfinite(v)) for v in torch.aminmax(M))


def squared_norm(M: Tensor) -> float:
    """‖M‖_F² accumulated in float64, chunk by chunk (no float64 copy of M)."""
    total = torch.zeros((), dtype=torch.float64, device=M.device)
    for c in _chunks(M):
        c = c.double()
        total += c.dot(c)
    return float(total)


def _eigh_overwrite(G: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (ascending) and eigenvectors of the symmetric float64 G, which is destroyed.

    LAPACK's MRRR driver (syevr) needs O(r) workspace beside its r×r eigenvectors, where
    torch.linalg.eigh (syevd) copies G and takes 2r² more: the difference between holding two and
    four Gram-sized buffers at the basis build's peak.
    """
    # G is symmetric, so its transpose is the same matrix in the Fortran order LAPACK works in place on.
    w, Z = scipy.linalg.eigh(G.numpy().T, overwrite_a=True, driver="evr", check_finite=False)
    return torch.from_numpy(w), torch.from_numpy(Z)


class Factorization:
    """The singular values of Δ and, on demand, chosen singular vectors of either side (float32).

    "svd" keeps U and V of `torch.linalg.svd`. "gram" keeps the eigenvectors W of the smaller Gram
    matrix; the other side's vectors Δw_i/σ_i are recovered only for the columns asked for, so a
    basis of k directions never holds all r of them.
    """

    def __init__(self, delta: Tensor | Callable[[], Tensor], method: str = "auto"):
        """`delta`: Δ, or a function giving Δ that may be called again. With a function the Gram
        path lets go of Δ before the eigendecomposition and asks for it again to recover the other
        side, so Δ, the Gram matrix and its eigenvectors are never all held at once."""
        check_choice("method", method, METHODS)
        reread = delta if callable(delta) else None
        raw = delta() if reread else delta
        self.source_shape = tuple(raw.shape)  # before a 1-D Δ becomes a column
        M = as_matrix(raw)
        del raw, delta
        if not all_finite(M):
            raise ValueError("delta contains NaN or inf")
        self.shape = tuple(M.shape)
        self.total = squared_norm(M)  # ‖Δ‖_F², float64
        self.M, self._reread = M, reread
        if (AUTO_METHOD if method == "auto" else method) == "svd":
            U, self.S, Vh = torch.linalg.svd(M, full_matrices=False)
            self._S64, self._vectors, self._W = self.S.double(), {"left": U, "right": Vh.T}, None
            return
        m, n = self.shape
        self.direct = "left" if m <= n else "right"  # the side whose Gram matrix (r×r) is the smaller
        G = _gram64(M, self.direct == "left")
        if reread is not None:
            self.M = M = None
        evals, W = _eigh_overwrite(G)
        del G
        self._S64 = evals.flip(0).clamp_min(0).sqrt()
        self.S = self._S64.float()
        self._W = W  # ascending: column r−1−j holds direction j
        self._vectors = None
        s = self._S64
        self.rank = int((s > s[0] * max(m, n) * FP32_EPS).sum()) if s[0] > 0 else 0

    def energy(self, idx: Tensor) -> float:
        """Σσ_i² over directions idx: ‖P_L Δ P_R‖_F² for the kept singular vectors on either side."""
        return float(self._S64[torch.as_tensor(idx, dtype=torch.long)].square().sum())

    def _matrix(self) -> Tensor:
        return self.M if self.M is not None else as_matrix(self._reread())

    def dim(self, side: str) -> int:
        return self.shape[0] if side == "left" else self.shape[1]

    def vectors(self, side: str, idx: Tensor | None = None, release: bool = False) -> Tensor:
        """Singular vectors of `side` for directions `idx` (default all r), as d×len(idx) float32.

        `release`: this is the last request, so the stored eigenvectors are freed as soon as the
        needed columns are taken, before the other side is recovered.
        """
        check_choice("side", side, SIDES)
        r = min(self.shape)
        idx = torch.arange(r) if idx is None else torch.as_tensor(idx, dtype=torch.long)
        if self._vectors is not None:
            out = self._vectors[side][:, idx].contiguous()
            if release:
                self._vectors = None
            return out
        if self._W is None:
            raise RuntimeError("the factorization's vectors were released")
        # Past the numerical rank the recovered side is completed from all the directions before it.
        complete = side != self.direct and bool((idx >= self.rank).any())
        taken = torch.arange(self.rank) if complete else idx
        W = self._W[:, r - 1 - taken]
        if release:
            self._W = None
        if side == self.direct:
            return W.float()
        M = self._matrix()
        A = M if side == "left" else M.T
        Y = self._recover(A, W, self._S64[taken])
        if not complete:
            return Y
        del W, M, A
        full = torch.cat([Y, _complete(Y.double(), r - self.rank).float()], dim=1)
        return full[:, idx].contiguous()

    @staticmethod
    def _recover(A: Tensor, W: Tensor, S: Tensor) -> Tensor:
        """A·w_i/σ_i in float64 by row blocks, stored as float32."""
        Y = torch.empty(A.shape[0], W.shape[1], dtype=torch.float32)
        for start, B in _row_blocks(A):
            Y[start : start + BLOCK] = (B @ W).div_(S)
        return Y


def factorize(
    delta: Tensor, left: bool = True, right: bool = True, method: str = "auto"
) -> tuple[Tensor | None, Tensor, Tensor | None]:
    """(U m×r or None, S (r,), V n×r or None) with r = min(m, n), S descending, float32."""
    f = Factorization(delta, method)
    return (f.vectors("left") if left else None), f.S, (f.vectors("right") if right else None)


def side_spectrum(delta: Tensor, side: str = "left", method: str = "auto") -> tuple[Tensor, Tensor]:
    """(Q, S): singular vectors of one side (left m×r, right n×r) and the full spectrum S (r,)."""
    check_choice("side", side, SIDES)
    U, S, V = factorize(delta, left=side == "left", right=side == "right", method=method)
    return (U if side == "left" else V), S


def energy_spectrum(delta: Tensor) -> Tensor:
    """Singular values only (descending, float32) from the eigenvalues of the smaller Gram matrix.

    Exact S at a fraction of the SVD's cost; enough for k(η) and energy curves.
    """
    M = as_matrix(delta)
    if not all_finite(M):
        raise ValueError("delta contains NaN or inf")
    return torch.linalg.eigvalsh(_gram64(M, M.shape[0] <= M.shape[1])).flip(0).clamp_min(0).sqrt().float()


def k_for_frac(frac: float, m: int, n: int) -> int:
    """k = round(frac·min(m, n)) (halves round up), at least 1."""
    check_fraction("frac", frac)
    if m < 1 or n < 1:
        raise ValueError(f"matrix shape must be positive, got {m}×{n}")
    return max(1, math.floor(frac * min(m, n) + 0.5))


def k_for_energy(S: Tensor, eta: float, rtol: float | None = None) -> int:
    """Fewest k whose top-k singular values hold at least η of the energy Σσ².

    Singular values at or below rtol·σ₁ are numerical noise and count as zero (default rtol =
    len(S)·eps(float32), the float32 numerical-rank threshold), so η = 1 gives the numerical rank
    of a rank-deficient delta instead of all r directions.
    """
    check_fraction("eta", eta)
    if S.ndim != 1 or S.numel() == 0:
        raise ValueError(f"expected a non-empty 1-D spectrum, got shape {tuple(S.shape)}")
    s = S.detach().double().cpu().sort(descending=True).values
    if not torch.isfinite(s).all() or (s < 0).any():
        raise ValueError("spectrum must be finite and non-negative")
    if s[0] == 0:
        raise ValueError("delta is zero: no energy to keep")
    tol = (len(s) * FP32_EPS) if rtol is None else rtol
    energy = torch.where(s > tol * s[0], s * s, torch.zeros_like(s))
    cumulative = energy.cumsum(0)
    # cumulative[-1] is the total exactly, so η = 1 stops at the last non-zero value.
    return int((cumulative < eta * cumulative[-1]).sum()) + 1


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed, stable across processes: (seed, crc32(name)), never Python's hash()."""
    check_seed(seed)
    # torch's CPU generator keeps only 32 seed bits; an odd multiplier keeps seeds apart within them.
    return (seed * 0x9E3779B1 + zlib.crc32(name.encode("utf-8"))) & 0xFFFFFFFF


def pick_indices(selection: str, r: int, k: int, seed: int = 0, name: str = "") -> Tensor:
    """Column indices of the kept directions among r: the first k, or k seeded at random."""
    check_choice("selection", selection, SELECTIONS)
    if not 1 <= k <= r:
        raise ValueError(f"k={k} is out of range for {name or 'tensor'}: available rank is {r}")
    if selection == "random-k":
        gen = torch.Generator().manual_seed(tensor_seed(seed, name))
        return torch.randperm(r, generator=gen)[:k].sort().values
    return torch.arange(k)


def gaussian_matrix(shape: tuple[int, int], seed: int, name: str) -> Tensor:
    """The seeded Gaussian matrix of `shape` whose singular vectors are the "random" control."""
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"selection 'random' needs a 2-D matrix shape, got {shape!r}")
    gen = torch.Generator().manual_seed(tensor_seed(seed, name))
    return torch.randn(tuple(shape), generator=gen)


def gaussian_factors(
    shape: tuple[int, int], seed: int, name: str, left: bool = True, right: bool = True, method: str = "auto"
) -> tuple[Tensor | None, Tensor, Tensor | None]:
    """Singular vectors of a seeded Gaussian matrix of `shape` (the "random" control)."""
    return factorize(gaussian_matrix(shape, seed, name), left=left, right=right, method=method)


def select_vectors(
    Q: Tensor | None,
    k: int,
    selection: str = "top",
    seed: int = 0,
    shape: tuple[int, int] | None = None,
    side: str = "left",
    name: str = "",
) -> Tensor:
    """The kept directions (d×k).

    "top": the first k columns of Q; "random-k": k columns of Q chosen uniformly at random;
    "random": the top-k singular vectors (on `side`) of a Gaussian matrix of `shape`. Random
    choices are seeded per tensor from (seed, name), so they repeat across runs and processes.
    """
    check_choice("selection", selection, SELECTIONS)
    check_choice("side", side, SIDES)
    if selection == "random":
        if shape is None:
            raise ValueError("selection 'random' needs the matrix shape")
        shape = (int(shape[0]), 1) if len(shape) == 1 else tuple(int(s) for s in shape)
        pick_indices("top", min(shape), k, name=name)  # range check
        U, _, V = gaussian_factors(shape, seed, name, left=side == "left", right=side == "right")
        return (U if side == "left" else V)[:, :k].contiguous()
    if Q is None or Q.ndim != 2:
        raise ValueError(f"selection {selection!r} needs a d×r matrix of singular vectors")
    return Q[:, pick_indices(selection, Q.shape[1], k, seed, name)].contiguous()
