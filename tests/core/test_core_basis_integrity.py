"""A basis file carries a digest per tensor and orthonormal factors; a flipped bit or a bent factor is refused."""

import pytest
import torch

from helpers.corrupt import flip_bit
from safeproj.core.basis import Basis, build_basis, orthonormality_error
from safeproj.core.deltas import TensorDelta
from safeproj.core.factors import Factor

Q_NAME, UP_NAME = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"


def _basis(frac=0.25):
    g = torch.Generator().manual_seed(0)
    start = {Q_NAME: torch.randn(24, 16, generator=g), UP_NAME: torch.randn(16, 24, generator=g)}
    end = {n: w + torch.randn(w.shape, generator=g) for n, w in start.items()}
    return build_basis(TensorDelta(end, start), frac=frac, side="both", progress=False)


def test_saved_basis_loads_and_is_orthonormal(tmp_path):
    _basis().save(tmp_path / "b.safetensors")
    loaded = Basis.load(tmp_path / "b.safetensors")
    for entry in loaded.entries.values():
        for factor in entry.factors().values():
            assert orthonormality_error(factor.Q) < 1e-5


@pytest.mark.parametrize(("byte", "bit"), [(0, 0), (3, 5)], ids=["lowest-mantissa-bit", "exponent-bit"])
def test_flipped_bit_is_refused_in_one_line(tmp_path, byte, bit):
    path = tmp_path / "b.safetensors"
    _basis().save(path)
    flip_bit(path, f"{Q_NAME}::left", byte, bit)
    with pytest.raises(
        ValueError, match=r"^cannot read basis file .*q_proj\.weight::left does not match its digest"
    ) as err:
        Basis.load(path)
    assert "\n" not in str(err.value)


def test_factor_that_is_not_orthonormal_is_refused(tmp_path):
    basis = _basis()
    entry = basis.entries[Q_NAME]
    Q = entry.left.Q.clone()
    Q[0, 0] += 2e-2  # what one flipped bit did to a cached basis; the digest is written for the bent factor
    entry.left = Factor(Q, entry.left.complement)
    basis.save(tmp_path / "b.safetensors")
    with pytest.raises(ValueError, match=r"q_proj\.weight::left is not orthonormal"):
        Basis.load(tmp_path / "b.safetensors")
