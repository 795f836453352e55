"""SafeLoRA math on bare tensors: the post hoc baseline of Hsu et al. 2024 ("Safe LoRA: the Silver
Lining of Reducing Safety Risks when Finetuning Large Language Models", arXiv 2405.16833).

Per weight matrix, the alignment matrix is V = W_aligned − W_base (Δ_A), and SafeLoRA's
"projection" is

    C = V Vᵀ / ‖V‖_F                                                  (variant="safelora")

exactly as the paper and its reference code define it. C is *not* a projector unless V's columns
are orthonormal up to the norm: its eigenvalues are σᵢ²/‖V‖_F, so C·C ≠ C in general and C rescales
the update as well as rotating it (by σ₁²/‖V‖_F at most, which can be far from 1). The selection is
unaffected (cosine similarity ignores scale), the rewritten weights are not. `variant="orthonormal"`
replaces C by the orthogonal projector U_k U_kᵀ onto the top-k left singular vectors of V (k from
`frac` or `eta`, the convention used everywhere in safeproj), which is idempotent and never
lengthens the update. A rank fraction larger than rank(V)/min(m, n) makes it keep directions of V's
null space, which are arbitrary; `eta` never does (directions below float32 noise hold no energy).

A layer's update ΔW is replaced by C·ΔW when the cosine similarity ⟨ΔW, C·ΔW⟩_F / (‖ΔW‖_F‖C·ΔW‖_F)
is at or below a threshold τ (SafeLoRA's `cos <= threshold`), or for the N layers of lowest
similarity. Low similarity means the update points away from the alignment directions.

For a LoRA layer ΔW = s·B·A; writing B ← C·B gives s·(C·B)·A = C·ΔW exactly, touching neither A nor
the base weight, as SafeLoRA itself does. For a fully fine-tuned layer W ← W₀ + C·(W − W₀). The
`SafeLoRA` callback applies this at the end of a training run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
from torch import Tensor

from safeproj.core.factors import Factor
from safeproj.core.options import check_choice
from safeproj.core.projector import project_left
from safeproj.core.sharded import SumOverRows
from safeproj.core.spectrum import all_finite, k_for_energy, k_for_frac, select_vectors, side_spectrum, squared_norm

Variant = Literal["safelora", "orthonormal"]
VARIANTS: tuple[str, ...] = get_args(Variant)
VARIANT_TEXT = {
    "safelora": "C = VVᵀ/‖V‖_F (SafeLoRA's definition, not a projector)",
    "orthonormal": "C = U_k U_kᵀ (orthogonal projector on V's top-k left singular vectors)",
}


@dataclass
class SafeLoRAProjection:
    """C = scale · F Fᵀ for one layer, kept in factored form (F is m×p, p ≤ n).

    "safelora": F = V, scale = 1/‖V‖_F. "orthonormal": F = U_k, scale = 1.
    """

    variant: Variant
    vectors: Tensor
    scale: float = 1.0

    @property
    def dim(self) -> int:
        """m: C acts on the output space of the weight."""
        return self.vectors.shape[0]

    @property
    def rank(self) -> int:
        """Columns of F (k for the orthonormal variant, n for SafeLoRA's V)."""
        return self.vectors.shape[1]

    def matrix(self) -> Tensor:
        """C as a dense m×m float32 matrix (for inspection and tests; `__call__` avoids forming it)."""
        F = self.vectors.float()
        return self.scale * (F @ F.T)

    def __call__(self, X: Tensor) -> Tensor:
        """C·X in float32 for X with m rows (a full update or a LoRA B), cast back to X's dtype."""
        if X.ndim != 2 or X.shape[0] != self.dim:
            raise ValueError(f"C is {self.dim}×{self.dim} but the update has shape {tuple(X.shape)}")
        if self.variant == "orthonormal":
            return project_left(X, Factor(self.vectors, complement=False), "parallel")
        F = self.vectors.to(device=X.device, dtype=torch.float32)
        x = X.float()
        m, p, c = self.dim, self.rank, x.shape[1]
        # F(Fᵀx) costs 2·m·p·c; forming C first costs m²·(p + c). Pick the cheaper order.
        if 2 * m * p * c <= m * m * (p + c):
            out = F @ (F.T @ x)
        else:
            out = (F @ F.T) @ x
        return (self.scale * out).to(X.dtype)

    def rows(self, local: Tensor, start: int, sum_over_rows: SumOverRows) -> Tensor:
        """Rows start:start+len(local) of C·X for X (m rows) sharded by rows across processes.

        C·X = scale·F(FᵀX) and FᵀX sums over rows: one p×c all-reduce (p = n for SafeLoRA's V, k for
        U_k; c = r for a LoRA B, n for a full update). Every process sharing X's rows calls it together.
        """
        if local.ndim != 2 or not 0 <= start <= start + local.shape[0] <= self.dim:
            raise ValueError(f"rows {start}:{start + local.shape[0]} do not fit C of size {self.dim}")
        F = self.vectors.to(device=local.device, dtype=torch.float32)[start : start + local.shape[0]]
        out = F @ sum_over_rows(F.T @ local.float())
        return (self.scale * out).to(local.dtype)


def safelora_projection(
    V: Tensor, variant: Variant = "safelora", frac: float | None = 0.5, eta: float | None = None
) -> SafeLoRAProjection:
    """C for an alignment matrix V = W_aligned − W_base (m×n).

    "safelora": C = VVᵀ/‖V‖_F (frac/eta unused). "orthonormal": C = U_kU_kᵀ with k = round(frac·min(m, n))
    or the fewest directions holding η of ‖V‖_F² (give exactly one of frac and eta).
    """
    check_choice("variant", variant, VARIANTS)
    if V.ndim != 2:
        raise ValueError(f"alignment matrix must be 2-D, got shape {tuple(V.shape)}")
    M = V.float()
    if not all_finite(M):
        raise ValueError("alignment matrix contains NaN or inf")
    norm = squared_norm(M) ** 0.5
    if norm == 0:
        raise ValueError("alignment matrix is zero: aligned and base weights are equal")
    if variant == "safelora":
        return SafeLoRAProjection("safelora", M, 1.0 / norm)
    if (frac is None) == (eta is None):
        raise ValueError(f"give exactly one of frac and eta (got frac={frac!r}, eta={eta!r})")
    Q, S = side_spectrum(M, side="left")
    k = k_for_frac(frac, *M.shape) if frac is not None else k_for_energy(S, eta)
    return SafeLoRAProjection("orthonormal", select_vectors(Q, k, "top"), 1.0)


def cosine(x: Tensor, y: Tensor) -> float:
    """Frobenius cosine ⟨x, y⟩ / (‖x‖‖y‖) in float64; NaN when either is zero."""
    a, b = x.double().reshape(-1), y.double().reshape(-1)
    denom = float(a.norm() * b.norm())
    return float(a @ b) / denom if denom > 0 else math.nan


def lora_cosine(b: Tensor, projected_b: Tensor, a: Tensor) -> float:
    """cosine(B·A, (C·B)·A) without forming either m×n product.

    ⟨XA, YA⟩_F = tr(XᵀY·AAᵀ), so only r×r matrices are needed (the LoRA scale cancels).
    """
    X, Y = b.double(), projected_b.double()
    return _lora_cosine(X.T @ X, X.T @ Y, Y.T @ Y, a)


def _lora_cosine(xx: Tensor, xy: Tensor, yy: Tensor, a: Tensor) -> float:
    """The cosine of X·A and Y·A from XᵀX, XᵀY, YᵀY (r×r each)."""
    A = a.double().to(xx.device)
    gram = A @ A.T  # (r, r)

    def inner(pq: Tensor) -> float:
        return float((pq * gram).sum())

    denom = inner(xx) * inner(yy)
    return inner(xy) / math.sqrt(denom) if denom > 0 else math.nan


def cosine_of_rows(x: Tensor, y: Tensor, sum_over_rows: SumOverRows) -> float:
    """`cosine` of two row-sharded matrices from this process's rows of each: one all-reduce of 3 numbers."""
    a, b = x.double().reshape(-1), y.double().reshape(-1)
    xy, xx, yy = sum_over_rows(torch.stack([a @ b, a @ a, b @ b])).tolist()
    denom = math.sqrt(xx * yy)
    return xy / denom if denom > 0 else math.nan


def lora_cosine_of_rows(b: Tensor, projected_b: Tensor, a: Tensor, sum_over_rows: SumOverRows) -> float:
    """`lora_cosine` with B and C·B sharded by rows (this process's rows given) and A whole: BᵀB, Bᵀ(CB)
    and (CB)ᵀ(CB) sum over rows, one 3×r×r all-reduce."""
    X, Y = b.double(), projected_b.double()
    xx, xy, yy = sum_over_rows(torch.stack([X.T @ X, X.T @ Y, Y.T @ Y]))
    return _lora_cosine(xx, xy, yy, a)


def layer_similarity(C: SafeLoRAProjection, update: Tensor, lora_a: Tensor | None = None) -> float:
    """cosine(ΔW, C·ΔW) of one layer: `update` is ΔW itself, or LoRA's B when its A is given as `lora_a`."""
    projected = C(update.float())
    return cosine(update, projected) if lora_a is None else lora_cosine(update, projected, lora_a)


def select_layers(
    similarities: Mapping[str, float], threshold: float | None = None, num_layers: int | None = None
) -> list[str]:
    """Layers to project, in the order given: similarity ≤ threshold, or the num_layers lowest.

    NaN similarities (no update, or no alignment direction) are never selected; with num_layers
    larger than the number of finite similarities every finite one is selected.
    """
    if (threshold is None) == (num_layers is None):
        raise ValueError(f"give exactly one of threshold and num_layers (got {threshold!r}, {num_layers!r})")
    finite = {name: s for name, s in similarities.items() if not math.isnan(s)}
    if threshold is not None:
        if not math.isfinite(threshold):
            raise ValueError(f"threshold must be a finite number, got {threshold!r}")
        chosen = {name for name, s in finite.items() if s <= threshold}
    else:
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 0:
            raise ValueError(f"num_layers must be a non-negative integer, got {num_layers!r}")
        # Stable sort: ties go to the layer named first.
        chosen = set(sorted(finite, key=finite.__getitem__)[:num_layers])
    return [name for name in similarities if name in chosen]


@dataclass
class SafeLoRAResult:
    """Per-layer similarity, the selected layers, and every layer's update after SafeLoRA."""

    similarities: dict[str, float]
    selected: list[str]
    deltas: dict[str, Tensor] = field(default_factory=dict)


def apply_safelora(
    deltas: Mapping[str, Tensor],
    alignment: Mapping[str, Tensor],
    threshold: float | None = None,
    num_layers: int | None = None,
    variant: Variant = "safelora",
    frac: float | None = 0.5,
    eta: float | None = None,
) -> SafeLoRAResult:
    """SafeLoRA on in-memory updates: ΔW ← C·ΔW for the selected layers, unchanged for the rest.

    `deltas`: name → ΔW (m×n); `alignment`: name → V = W_aligned − W_base of the same shape. With
    eta given, frac is ignored.
    """
    if eta is not None:
        frac = None
    similarities: dict[str, float] = {}
    projected: dict[str, Tensor] = {}
    for name, delta in deltas.items():
        if name not in alignment:
            raise ValueError(f"no alignment matrix for layer {name!r}")
        if tuple(alignment[name].shape) != tuple(delta.shape):
            raise ValueError(
                f"layer {name!r}: update has shape {tuple(delta.shape)}, alignment {tuple(alignment[name].shape)}"
            )
        projected[name] = safelora_projection(alignment[name], variant, frac, eta)(delta.float())
        similarities[name] = cosine(delta, projected[name])
    selected = select_layers(similarities, threshold, num_layers)
    chosen = set(selected)
    new = {name: (projected[name] if name in chosen else deltas[name].float()) for name in deltas}
    return SafeLoRAResult(similarities, selected, new)
