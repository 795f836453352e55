"""SafeLoRA: the post hoc baseline of Hsu et al. 2024 ("Safe LoRA: the Silver Lining of Reducing
Safety Risks when Finetuning Large Language Models", arXiv 2405.16833).

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
the base weight, as SafeLoRA itself does. For a fully fine-tuned layer W ← W₀ + C·(W − W₀).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from tqdm.auto import tqdm
from typing_extensions import override

from safeproj.callbacks._options import basis_options
from safeproj.core.targets import Target, find_weights, model_weights
from safeproj.model.subspaces import delta_source, expand_spec
from safeproj.core.basis import Factor
from safeproj.core.deltas import CheckpointDelta, DeltaSource
from safeproj.core.projector import project_left
from safeproj.core.spectrum import (
    all_finite,
    k_for_energy,
    k_for_frac,
    select_vectors,
    side_spectrum,
    squared_norm,
)
from safeproj.model.loading import resolve

VARIANTS = ("safelora", "orthonormal")
VARIANT_TEXT = {
    "safelora": "C = VVᵀ/‖V‖_F (SafeLoRA's definition, not a projector)",
    "orthonormal": "C = U_k U_kᵀ (orthogonal projector on V's top-k left singular vectors)",
}


# --------------------------------------------------------------------------------------------
# Math on bare tensors


@dataclass
class SafeLoRAProjection:
    """C = scale · F Fᵀ for one layer, kept in factored form (F is m×p, p ≤ n).

    "safelora": F = V, scale = 1/‖V‖_F. "orthonormal": F = U_k, scale = 1.
    """

    variant: str
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


def safelora_projection(
    V: Tensor, variant: str = "safelora", frac: float | None = 0.5, eta: float | None = None
) -> SafeLoRAProjection:
    """C for an alignment matrix V = W_aligned − W_base (m×n).

    "safelora": C = VVᵀ/‖V‖_F (frac/eta unused). "orthonormal": C = U_kU_kᵀ with k = round(frac·min(m, n))
    or the fewest directions holding η of ‖V‖_F² (give exactly one of frac and eta).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")
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
    X, Y, A = b.double(), projected_b.double(), a.double()
    gram = A @ A.T  # (r, r)

    def inner(p: Tensor, q: Tensor) -> float:
        return float(((p.T @ q) * gram).sum())

    denom = inner(X, X) * inner(Y, Y)
    return inner(X, Y) / math.sqrt(denom) if denom > 0 else math.nan


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
    variant: str = "safelora",
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


# --------------------------------------------------------------------------------------------
# Callback


class SafeLoRA(Callback):
    """At train end, rewrites the layers whose update points away from the alignment directions.

    For every weight the alignment delta covers and the run trains (a LoRA adapter, or a trainable
    full weight), the update ΔW (s·B·A, or W − W₀ with W₀ kept on CPU at train start) is compared with
    C·ΔW; selected layers get B ← C·B (LoRA, exact: s·C·B·A = C·ΔW) or W ← W₀ + C·ΔW. Runs before the
    module's own `on_train_end`, so the saved checkpoint holds the rewritten weights. Logs per-layer
    similarities (`safelora/similarity/<name>`), counts, and a W&B table with the variant used.

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
        variant: str = "safelora",
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
        self._initial: dict[str, Tensor] = {}
        self._restored: dict[str, Tensor] | None = None
        self.similarities: dict[str, float] = {}
        self.selected: list[str] = []

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(aligned=self.aligned, base=self.base, variant=self.variant)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or self.source is not None:
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
                raise ValueError(
                    f"weight {name} has shape {tuple(shapes[name])} but its alignment delta {tuple(self.source.shape(name))}"
                )
        targets = [t for t in find_weights(model, self.source.names()) if t.is_lora or t.weight.ndim == 2]
        for t in targets:
            if t.is_lora and (t.lora_b.shape[0], t.lora_a.shape[1]) != tuple(shapes[t.name]):
                raise ValueError(f"LoRA factors of {t.name} do not multiply to its weight's shape (fan_in_fan_out?)")
        if not targets:
            raise ValueError("none of the aligned weights is trained in this model (no LoRA adapter, all frozen)")
        return targets

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # W₀ of the fully trained weights, on CPU (LoRA updates are read from the adapters).
        restored = self._restored or {}
        self._initial = {
            t.name: (restored[t.name] if t.name in restored else t.weight.detach()).to("cpu", torch.float32, copy=True)
            for t in self.targets
            if not t.is_lora
        }
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
            elif t.is_lora:
                self.similarities[t.name] = lora_cosine(t.lora_b, C(t.lora_b.float()), t.lora_a)
            else:
                delta = self._update(t)
                self.similarities[t.name] = cosine(delta, C(delta))
        self.selected = select_layers(self.similarities, self.threshold, self.num_layers)
        by_name = {t.name: t for t in self.targets}
        # The projection is rebuilt rather than kept: C·ΔW of every layer would hold a model's worth of memory.
        for name in tqdm(self.selected, desc="SafeLoRA rewrite", disable=not progress):
            t = by_name[name]
            C = self._projection(t)
            if t.is_lora:
                t.lora_b.copy_(C(t.lora_b.float()))
            else:
                w0 = self._initial[name].to(t.weight.device)
                t.weight.copy_(w0 + C(self._update(t)))
        return list(self.selected)

    def _projection(self, t: Target) -> SafeLoRAProjection | None:
        V = self.source.get(t.name)
        if not bool(V.any()):
            return None  # no alignment direction in this layer: nothing to compare with
        device = (t.lora_b if t.is_lora else t.weight).device
        return safelora_projection(V.to(device), self.variant, self.frac, self.eta)

    def _update(self, t: Target) -> Tensor:
        return t.weight.float() - self._initial[t.name].to(t.weight.device)

    @rank_zero_only
    def _log(self, trainer: Trainer) -> None:
        from safeproj.wandb import log_table

        finite = [s for s in self.similarities.values() if not math.isnan(s)]
        metrics = {f"safelora/similarity/{name}": s for name, s in self.similarities.items()}
        metrics.update(
            {
                "safelora/projected_layers": float(len(self.selected)),
                "safelora/total_layers": float(len(self.similarities)),
                "safelora/similarity_mean": sum(finite) / len(finite) if finite else math.nan,
            }
        )
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
            "initial": {k: v.detach().cpu() for k, v in self._initial.items()},
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

