import math

import pytest
import torch

from safeproj.core.basis import Factor
from safeproj.core.overlap import mso, principal_angles, random_baseline
from safeproj.core.spectrum import orthogonal_complement


def orthonormal(d, k, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=torch.float64))[0].float()


def test_identical_orthogonal_nested():
    Q = orthonormal(20, 8, 0)
    assert mso(Q, Q) == pytest.approx(1.0, abs=1e-6)
    assert mso(Q[:, :4], Q[:, 4:]) == pytest.approx(0.0, abs=1e-6)
    assert mso(Q[:, :3], Q) == pytest.approx(1.0, abs=1e-6)  # nested, either order
    assert mso(Q, Q[:, :3]) == pytest.approx(1.0, abs=1e-6)


def test_invariant_to_the_choice_of_basis():
    V, W = orthonormal(30, 6, 1), orthonormal(30, 9, 2)
    R = orthonormal(6, 6, 3)  # random orthogonal 6×6
    assert mso(V @ R, W) == pytest.approx(mso(V, W), abs=1e-6)
    torch.testing.assert_close(principal_angles(V @ R, W), principal_angles(V, W), atol=1e-5, rtol=0)


def test_partial_overlap_value():
    """V = span(e1, e2), W = span(e1, cos t·e2 + sin t·e3): MSO = (1 + cos²t)/2."""
    t = 0.7
    V = torch.eye(5)[:, :2]
    W = torch.stack([torch.eye(5)[0], math.cos(t) * torch.eye(5)[1] + math.sin(t) * torch.eye(5)[2]], 1)
    assert mso(V, W) == pytest.approx((1 + math.cos(t) ** 2) / 2, abs=1e-6)
    torch.testing.assert_close(principal_angles(V, W), torch.tensor([0.0, t]), atol=1e-6, rtol=0)


def test_complement_factors_give_the_same_overlap():
    V, W = orthonormal(16, 11, 4), orthonormal(16, 5, 5)
    Vc = Factor(orthogonal_complement(V), complement=True)
    Wc = Factor(orthogonal_complement(W), complement=True)
    expected = mso(V, W)
    for a, b in ((Vc, W), (V, Wc), (Vc, Wc), (Factor(V), Factor(W))):
        assert mso(a, b) == pytest.approx(expected, abs=1e-5)
    torch.testing.assert_close(principal_angles(Vc, Wc), principal_angles(V, W), atol=1e-5, rtol=0)


def test_random_pairs_average_the_baseline():
    d, kv, kw, trials = 40, 5, 12, 300
    gen = torch.Generator().manual_seed(0)
    V = torch.linalg.qr(torch.randn(trials, d, kv, generator=gen))[0]  # batched: one QR call
    W = torch.linalg.qr(torch.randn(trials, d, kw, generator=gen))[0]
    values = torch.tensor([mso(v, w) for v, w in zip(V, W)])
    baseline = random_baseline(kv, kw, d)
    assert baseline == pytest.approx(12 / 40)
    assert abs(values.mean() - baseline) < 3 * values.std() / trials**0.5


def test_mso_is_mean_squared_cosine():
    V, W = orthonormal(25, 4, 6), orthonormal(25, 7, 7)
    angles = principal_angles(V, W).double()
    assert angles.shape == (4,)
    assert torch.all(angles[1:] >= angles[:-1])
    assert torch.all((angles >= 0) & (angles <= math.pi / 2))
    assert mso(V, W) == pytest.approx(float(angles.cos().square().mean()), abs=1e-5)


def test_principal_angles_extremes():
    Q = orthonormal(10, 4, 8)
    assert principal_angles(Q, Q).max() < 1e-3  # sine branch keeps small angles near 0
    torch.testing.assert_close(principal_angles(Q[:, :2], Q[:, 2:]), torch.full((2,), math.pi / 2), atol=1e-6, rtol=0)
    tiny = 1e-4
    W = torch.eye(3)[:, :1] * math.cos(tiny) + torch.eye(3)[:, 1:2] * math.sin(tiny)
    assert principal_angles(torch.eye(3)[:, :1], W).item() == pytest.approx(tiny, rel=1e-3)


def test_overlap_errors():
    with pytest.raises(ValueError, match="different spaces"):
        mso(orthonormal(5, 2, 0), orthonormal(6, 2, 0))
    with pytest.raises(ValueError, match="different spaces"):
        principal_angles(orthonormal(5, 2, 0), orthonormal(6, 2, 0))
    with pytest.raises(ValueError, match="k=0"):
        mso(torch.zeros(5, 0), orthonormal(5, 2, 0))
    with pytest.raises(ValueError, match="kv=7"):
        random_baseline(7, 2, 5)
