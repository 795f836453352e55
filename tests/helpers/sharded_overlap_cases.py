"""Matrices shared by the sharded overlap and SafeLoRA test and its worker processes."""

import torch

from safeproj.core.deltas import TensorDelta

# name: (rows, columns). On two ranks FSDP2 splits rows ceil(m / 2) then the rest: 7 rows split 4 + 3,
# 5 rows 3 + 2, and 1 row leaves rank 1 empty.
SHAPES = {
    "model.layers.0.self_attn.q_proj.weight": (7, 5),  # tall
    "model.layers.0.mlp.down_proj.weight": (5, 9),  # wide: the n×n Gram has zero eigenvalues
    "model.layers.1.self_attn.o_proj.weight": (1, 6),  # one row
}
ETAS = (0.3, 0.6, 0.9, 1.0)
RANK = 2  # columns of the LoRA B


def matrices(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) for name, shape in SHAPES.items()}


def deltas() -> tuple[TensorDelta, TensorDelta]:
    """(the run's Δ, the reference), as in-memory deltas from zero."""
    run, ref = matrices(1), matrices(2)
    zeros = {name: torch.zeros(shape) for name, shape in SHAPES.items()}
    return TensorDelta(run, zeros), TensorDelta(ref, zeros)


def lora_factors(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(B m×RANK, A RANK×n) for a tensor's shape."""
    m, n = SHAPES[name]
    g = torch.Generator().manual_seed(3)
    return torch.randn(m, RANK, generator=g), torch.randn(RANK, n, generator=g)
