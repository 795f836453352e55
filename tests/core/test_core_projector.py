import pytest
import torch

from safeproj.core.basis import BasisEntry, Factor
from safeproj.core.projector import energy_share, project, project_left, project_right, random_share
from safeproj.core.spectrum import orthogonal_complement


def orthonormal(d, k, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, k, generator=gen))[0]


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def dense_projector(Q):
    return Q.double() @ Q.double().T


def entry(left=None, right=None, shape=(12, 9)):
    return BasisEntry("w", shape, left, right, energy_kept=0.0, energy_total=0.0)


@pytest.mark.parametrize("complement", [False, True])
def test_left_projector_algebra(complement):
    d, k = 12, 4
    Q = orthonormal(d, k, 0)
    f = Factor(orthogonal_complement(Q), complement=True) if complement else Factor(Q)
    assert (f.dim, f.k) == (d, k)
    X = randn(d, 7)
    PX = project_left(X, f, "parallel")
    QX = project_left(X, f, "orthogonal")
    torch.testing.assert_close(project_left(PX, f), PX, atol=1e-5, rtol=0)  # idempotent
    torch.testing.assert_close(PX + QX, X, atol=1e-5, rtol=0)  # P + P⊥ = I
    torch.testing.assert_close(Q @ (Q.T @ PX), PX, atol=1e-5, rtol=0)  # range(P) = span(Q)
    assert (Q.T @ QX).abs().max() < 1e-5  # P⊥X ⟂ span(Q)
    torch.testing.assert_close(PX.double(), dense_projector(Q) @ X.double(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("complement", [False, True])
def test_right_projector_algebra(complement):
    d, k = 9, 6
    Q = orthonormal(d, k, 1)
    f = Factor(orthogonal_complement(Q), complement=True) if complement else Factor(Q)
    X = randn(5, d, seed=1)
    XP = project_right(X, f)
    torch.testing.assert_close(project_right(XP, f), XP, atol=1e-5, rtol=0)
    torch.testing.assert_close(XP + project_right(X, f, "orthogonal"), X, atol=1e-5, rtol=0)
    torch.testing.assert_close(XP.double(), X.double() @ dense_projector(Q), atol=1e-5, rtol=0)


def test_complement_storage_is_the_same_projector():
    Q = orthonormal(10, 7, 2)
    direct, comp = Factor(Q), Factor(orthogonal_complement(Q), complement=True)
    assert comp.Q.shape[1] == 3 and comp.k == direct.k == 7
    X = randn(10, 10, seed=2)
    for keep in ("parallel", "orthogonal"):
        torch.testing.assert_close(project_left(X, direct, keep), project_left(X, comp, keep), atol=1e-5, rtol=0)
        torch.testing.assert_close(project_right(X, direct, keep), project_right(X, comp, keep), atol=1e-5, rtol=0)


def test_project_on_both_sides():
    QL, QR = orthonormal(12, 3, 3), orthonormal(9, 5, 4)
    e = entry(Factor(QL), Factor(orthogonal_complement(QR), complement=True))
    X = randn(12, 9, seed=3)
    expected = dense_projector(QL) @ X.double() @ dense_projector(QR)
    torch.testing.assert_close(project(X, e).double(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(project(X, e, "orthogonal").double(), X.double() - expected, atol=1e-5, rtol=0)
    # One side only is the one-sided projector.
    torch.testing.assert_close(project(X, entry(left=Factor(QL))), project_left(X, Factor(QL)))
    torch.testing.assert_close(project(X, entry(right=Factor(QR))), project_right(X, Factor(QR)))


def test_lora_factors_stay_in_the_subspace():
    """Projecting B on the left keeps B·A in range(P_L); projecting A on the right keeps it in range(P_R)."""
    QL, QR = orthonormal(12, 4, 5), orthonormal(9, 3, 6)
    B, A = randn(12, 2, seed=5), randn(2, 9, seed=6)
    dW = project_left(B, Factor(QL)) @ A
    torch.testing.assert_close(project_left(dW, Factor(QL)), dW, atol=1e-5, rtol=0)
    dW = B @ project_right(A, Factor(QR))
    torch.testing.assert_close(project_right(dW, Factor(QR)), dW, atol=1e-5, rtol=0)


def test_dtype_is_preserved_and_math_is_float32():
    Q = orthonormal(16, 4, 7)
    X = randn(16, 8, seed=7).bfloat16()
    out = project_left(X, Factor(Q))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, project_left(X.float(), Factor(Q)).bfloat16())


def test_vectors_are_columns():
    Q = orthonormal(6, 2, 8)
    v = randn(6, seed=8)
    e = entry(left=Factor(Q), shape=(6,))
    out = project(v, e)
    assert out.shape == (6,)
    torch.testing.assert_close(out.double(), dense_projector(Q) @ v.double(), atol=1e-6, rtol=0)


def test_energy_and_random_share():
    QL, QR = orthonormal(12, 3, 9), orthonormal(9, 6, 10)
    e = entry(Factor(QL), Factor(orthogonal_complement(QR), complement=True))
    X = randn(12, 9, seed=9)
    kept = dense_projector(QL) @ X.double() @ dense_projector(QR)
    assert energy_share(X, e) == pytest.approx(float(kept.square().sum() / X.double().square().sum()), rel=1e-5)
    assert random_share(e) == pytest.approx(3 / 12 * 6 / 9)
    assert random_share(entry(left=Factor(QL))) == pytest.approx(3 / 12)
    assert energy_share(QL[:, :1] @ randn(1, 9), entry(left=Factor(QL))) == pytest.approx(1.0, abs=1e-5)


def test_projector_errors():
    f = Factor(orthonormal(6, 2, 0))
    with pytest.raises(ValueError, match="keep 'inside'.*parallel, orthogonal"):
        project_left(torch.ones(6, 2), f, "inside")
    with pytest.raises(ValueError, match="5 rows.*R\\^6"):
        project_left(torch.ones(5, 2), f)
    with pytest.raises(ValueError, match="3 columns.*R\\^6"):
        project_right(torch.ones(2, 3), f)
    with pytest.raises(ValueError, match="does not fit basis entry 'w'"):
        project(torch.ones(6, 3), entry(left=f, shape=(6, 4)))
    with pytest.raises(ValueError, match="zero tensor"):
        energy_share(torch.zeros(6, 4), entry(left=f, shape=(6, 4)))
    with pytest.raises(ValueError, match="no factor"):
        project(torch.ones(6, 4), entry(shape=(6, 4)))
