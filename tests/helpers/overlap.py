"""Deltas with known subspaces and checkpoints on disk, shared by the overlap tests."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

LLAMA_MODULES = {
    "self_attn.q_proj": (32, 32),
    "self_attn.k_proj": (16, 32),
    "self_attn.v_proj": (16, 32),
    "self_attn.o_proj": (32, 32),
    "mlp.gate_proj": (48, 32),
    "mlp.up_proj": (48, 32),
    "mlp.down_proj": (32, 48),
}


def llama_shapes(layers: int = 2) -> dict[str, tuple[int, int]]:
    return {f"model.layers.{i}.{mod}.weight": shape for i in range(layers) for mod, shape in LLAMA_MODULES.items()}


def orthonormal(d: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=torch.float64))[0]


def with_columns(U: torch.Tensor, s, n: int, seed: int) -> torch.Tensor:
    """U·diag(s)·Vᵀ (float32): a matrix whose left singular vectors are U's columns, in order."""
    V = orthonormal(n, U.shape[1], seed)
    return ((U * torch.as_tensor(s, dtype=torch.float64)) @ V.T).float()


def gaussian(shapes: dict, seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen) * scale for name, shape in shapes.items()}


def zeros_like(tensors: dict) -> dict[str, torch.Tensor]:
    return {name: torch.zeros_like(t) for name, t in tensors.items()}


def write_checkpoint(directory: Path, tensors: dict[str, torch.Tensor]) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"))
    return str(directory)
