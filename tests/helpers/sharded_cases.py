"""Tensors and basis entries shared by the sharded projection test and its worker processes."""

import torch

from safeproj.core.factors import BasisEntry, Factor

# name: (rows, columns, left k or None, right k or None, complement, keep). On two ranks FSDP2's
# row split is ceil(m / 2) then the rest: 5 rows split 3 + 2, 1 row leaves rank 1 empty.
CASES = {
    "left_uneven": (5, 6, 2, None, False, "parallel"),
    "left_uneven_orthogonal": (5, 6, 3, None, False, "orthogonal"),
    "left_complement": (7, 4, 2, None, True, "orthogonal"),
    "left_empty_rank": (1, 5, 1, None, False, "orthogonal"),
    "right": (5, 8, None, 3, False, "orthogonal"),
    "both_sides": (7, 6, 3, 2, False, "orthogonal"),
}


def _orthonormal(d: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, k, generator=g))[0]


def case_tensors(name: str):
    """(X, W0, entry, keep) of a case, the same on every process."""
    m, n, k_left, k_right, complement, keep = CASES[name]
    g = torch.Generator().manual_seed(len(name))
    X, W0 = torch.randn(m, n, generator=g), torch.randn(m, n, generator=g)
    left = Factor(_orthonormal(m, k_left, 1), complement) if k_left else None
    right = Factor(_orthonormal(n, k_right, 2), complement) if k_right else None
    entry = BasisEntry(name=name, shape=(m, n), left=left, right=right, energy_kept=0.0, energy_total=0.0)
    return X, W0, entry, keep
