"""The stored form of a subspace: one side's orthonormal factor, and a tensor's entry of one or two sides."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class Factor:
    """One side's subspace. If `complement`, Q's columns span the complement of the kept subspace."""

    Q: Tensor
    complement: bool = False

    @property
    def dim(self) -> int:
        """Dimension d of the space the subspace lives in."""
        return self.Q.shape[0]

    @property
    def k(self) -> int:
        """Dimension of the kept subspace."""
        return self.dim - self.Q.shape[1] if self.complement else self.Q.shape[1]


@dataclass
class BasisEntry:
    """The kept subspace of one tensor; `energy_kept` is the share of ‖Δ‖_F² inside it."""

    name: str
    shape: tuple[int, ...]
    left: Factor | None
    right: Factor | None
    energy_kept: float
    energy_total: float
    spectrum: Tensor | None = None

    def factors(self) -> dict[str, Factor]:
        return {side: f for side, f in (("left", self.left), ("right", self.right)) if f is not None}

    def nbytes(self) -> int:
        """Bytes of the stored tensors (factors and spectrum)."""
        stored = [f.Q for f in self.factors().values()] + ([self.spectrum] if self.spectrum is not None else [])
        return sum(t.numel() * t.element_size() for t in stored)
