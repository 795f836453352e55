import os
import subprocess
import sys

import pytest
import torch

from safeproj.core import spectrum
from safeproj.core.spectrum import (
    energy_spectrum,
    k_for_energy,
    k_for_frac,
    orthogonal_complement,
    select_vectors,
    side_spectrum,
)


def orthonormal(d, k, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=torch.float64))[0]


def with_spectrum(m, n, s, seed=0):
    """m×n matrix with singular values s (len(s) <= min(m, n)), float32."""
    r = len(s)
    U, V = orthonormal(m, r, seed), orthonormal(n, r, seed + 1)
    return (U * torch.as_tensor(s, dtype=torch.float64)) @ V.T


def projector(Q):
    Q = Q.double()
    return Q @ Q.T


@pytest.fixture(params=[spectrum.BLOCK, 7], ids=["one-block", "blocks-of-7"])
def block(request, monkeypatch):
    """The Gram path converts Δ to float64 in blocks; small blocks split every test matrix."""
    monkeypatch.setattr(spectrum, "BLOCK", request.param)
    return request.param


@pytest.mark.parametrize("shape", [(40, 70), (70, 40), (50, 50)])
@pytest.mark.parametrize("side", ["left", "right"])
def test_gram_matches_svd_on_separated_leading_subspaces(shape, side, block):
    m, n = shape
    s = 2.0 ** -torch.arange(min(m, n), dtype=torch.float64) * 10 + 1e-3  # distinct, decaying
    M = with_spectrum(m, n, s).float()
    Qs, Ss = side_spectrum(M, side, method="svd")
    Qg, Sg = side_spectrum(M, side, method="gram")
    d = m if side == "left" else n
    assert Qs.shape == Qg.shape == (d, min(m, n))
    assert Sg.dtype == Qg.dtype == torch.float32
    torch.testing.assert_close(Sg, Ss, rtol=0, atol=1e-5 * Ss[0].item())
    assert torch.all(Sg[:-1] >= Sg[1:])
    # Reference: float64 SVD of the same float32 matrix.
    U64, S64, Vh64 = torch.linalg.svd(M.double(), full_matrices=False)
    Q64 = U64 if side == "left" else Vh64.T
    for k in (1, 2, 5, 10):
        gap = (S64[k - 1] - S64[k]).item()
        # float32 SVD subspaces are accurate to about eps·σ₁/gap; the float64 Gram path does better.
        svd_tol = 20 * torch.finfo(torch.float32).eps * S64[0].item() / gap
        assert (projector(Qg[:, :k]) - projector(Qs[:, :k])).abs().max() < svd_tol
        assert (projector(Qg[:, :k]) - projector(Q64[:, :k])).abs().max() < 2e-6
    # Gram path columns are orthonormal, including recovered ones.
    eye = torch.eye(min(m, n), dtype=torch.float64)
    torch.testing.assert_close(Qg.T.double() @ Qg.double(), eye, atol=1e-5, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_rank_deficient_gram_completes_null_directions(side, block):
    m, n, rank = 60, 25, 4  # tall: left side is recovered, right side direct
    M = with_spectrum(m, n, [5.0, 3.0, 2.0, 1.0], seed=3).float()
    Qg, S = side_spectrum(M, side, method="gram")
    Qs, _ = side_spectrum(M, side, method="svd")
    assert Qg.shape[1] == n
    torch.testing.assert_close(Qg.T.double() @ Qg.double(), torch.eye(n, dtype=torch.float64), atol=1e-5, rtol=0)
    assert (projector(Qg[:, :rank]) - projector(Qs[:, :rank])).abs().max() < 1e-5
    assert S[rank:].max() < 1e-5 * S[0]
    # The completed directions are orthogonal to the column (left) or row (right) space of M.
    null = Qg[:, rank:].double()
    residual = (null.T @ M.double()) if side == "left" else (M.double() @ null)
    assert residual.abs().max() < 1e-4


def test_energy_spectrum_matches_svdvals(block):
    M = with_spectrum(30, 80, torch.linspace(4, 0.1, 30)).float()
    torch.testing.assert_close(energy_spectrum(M), torch.linalg.svdvals(M), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(energy_spectrum(M.T), torch.linalg.svdvals(M), atol=1e-5, rtol=1e-5)


def test_vector_is_an_m_by_1_matrix():
    v = torch.tensor([3.0, 0.0, 4.0])
    Q, S = side_spectrum(v, "left")
    torch.testing.assert_close(S, torch.tensor([5.0]))
    torch.testing.assert_close((Q[:, 0] * Q[0, 0].sign()), v / 5)
    Qr, _ = side_spectrum(v, "right")
    assert Qr.shape == (1, 1)


def test_side_spectrum_rejects_bad_arguments():
    with pytest.raises(ValueError, match="side 'top'.*left, right"):
        side_spectrum(torch.ones(2, 2), "top")
    with pytest.raises(ValueError, match="method 'qr'"):
        side_spectrum(torch.ones(2, 2), method="qr")
    with pytest.raises(ValueError, match="NaN"):
        side_spectrum(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="1-D or 2-D"):
        side_spectrum(torch.ones(2, 2, 2))


def test_k_for_frac():
    assert k_for_frac(0.5, 64, 160) == 32
    assert k_for_frac(0.5, 63, 100) == 32  # 31.5 rounds up
    assert k_for_frac(1, 10, 7) == 7
    assert k_for_frac(0.01, 10, 10) == 1  # at least one direction
    for bad in (0, -0.1, 1.5, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match="frac must be in"):
            k_for_frac(bad, 10, 10)


def test_k_for_energy_is_minimal():
    gen = torch.Generator().manual_seed(0)
    for _trial in range(20):
        S = torch.rand(30, generator=gen).sort(descending=True).values
        energy = (S.double() ** 2).cumsum(0)
        for eta in (0.1, 0.5, 0.9, 0.99):
            k = k_for_energy(S, eta)
            assert energy[k - 1] >= eta * energy[-1]
            if k > 1:
                assert energy[k - 2] < eta * energy[-1]


def test_k_for_energy_eta_one_gives_numerical_rank():
    assert k_for_energy(torch.tensor([3.0, 2.0, 1.0]), 1.0) == 3
    # Trailing float32 noise of a rank-4 delta does not count.
    M = with_spectrum(50, 40, [4.0, 3.0, 2.0, 1.0]).float()
    for method in ("svd", "gram"):
        _, S = side_spectrum(M, "right", method=method)
        assert S[4:].max() > 0  # float32 rounding leaves a noise tail
        assert k_for_energy(S, 1.0) == 4
    assert k_for_energy(torch.tensor([1.0, 1e-3]), 1.0, rtol=1e-2) == 1
    # A small but genuine direction is kept.
    assert k_for_energy(torch.tensor([1.0, 1e-3]), 1.0) == 2


def test_k_for_energy_errors():
    with pytest.raises(ValueError, match="delta is zero"):
        k_for_energy(torch.zeros(5), 0.9)
    for bad in (0, 1.01, -1, float("nan")):
        with pytest.raises(ValueError, match="eta must be in"):
            k_for_energy(torch.ones(3), bad)
    with pytest.raises(ValueError, match="non-negative"):
        k_for_energy(torch.tensor([1.0, -1.0]), 0.5)


def test_select_top_and_random_k():
    Q = orthonormal(20, 20, 0).float()
    torch.testing.assert_close(select_vectors(Q, 3, "top"), Q[:, :3])
    a = select_vectors(Q, 5, "random-k", seed=1, name="w")
    assert a.shape == (20, 5)
    torch.testing.assert_close(a, select_vectors(Q, 5, "random-k", seed=1, name="w"))
    assert not torch.equal(a, select_vectors(Q, 5, "random-k", seed=2, name="w"))
    assert not torch.equal(a, select_vectors(Q, 5, "random-k", seed=1, name="other"))
    # Each picked vector is one of Q's columns.
    match = (a.T @ Q).abs()
    torch.testing.assert_close(match.max(dim=1).values, torch.ones(5))


def test_select_random_is_seeded_orthonormal():
    a = select_vectors(None, 4, "random", seed=0, shape=(30, 12), side="left", name="w")
    b = select_vectors(None, 4, "random", seed=0, shape=(30, 12), side="left", name="w")
    c = select_vectors(None, 4, "random", seed=1, shape=(30, 12), side="left", name="w")
    r = select_vectors(None, 4, "random", seed=0, shape=(30, 12), side="right", name="w")
    assert a.shape == (30, 4) and r.shape == (12, 4)
    torch.testing.assert_close(a, b)
    assert (projector(a) - projector(c)).abs().max() > 0.1
    torch.testing.assert_close(a.T @ a, torch.eye(4), atol=1e-5, rtol=0)


def test_select_vectors_errors():
    Q = orthonormal(6, 4, 0).float()
    with pytest.raises(ValueError, match="available rank is 4"):
        select_vectors(Q, 5)
    with pytest.raises(ValueError, match="selection 'best'.*top, random-k, random"):
        select_vectors(Q, 2, "best")
    with pytest.raises(ValueError, match="needs the matrix shape"):
        select_vectors(None, 2, "random")
    with pytest.raises(ValueError, match="available rank is 3"):
        select_vectors(None, 4, "random", shape=(3, 8))


def test_random_k_seed_is_stable_across_processes():
    code = (
        "import torch; from safeproj.core.spectrum import select_vectors;"
        "Q = torch.eye(50); print(select_vectors(Q, 5, 'random-k', seed=7, name='model.layers.0.mlp.up_proj.weight')"
        ".argmax(0).tolist())"
    )
    Q = torch.eye(50)
    here = select_vectors(Q, 5, "random-k", seed=7, name="model.layers.0.mlp.up_proj.weight").argmax(0).tolist()
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(here)


@pytest.mark.parametrize("selection", ["random", "random-k"])
def test_random_subspace_keeps_k_over_d_of_the_energy(selection):
    """E‖PΔ‖²/‖Δ‖² = k/m for a uniformly random k-dim subspace (and for k of m singular vectors)."""
    m, n, k, trials = 24, 40, 6, 120
    delta = with_spectrum(m, n, torch.logspace(0, -2, m), seed=5).float()
    Q, _ = side_spectrum(delta, "left")
    shares = []
    for seed in range(trials):
        P = select_vectors(Q, k, selection, seed=seed, shape=(m, n), side="left", name="w").double()
        shares.append((P.T @ delta.double()).square().sum() / delta.double().square().sum())
    shares = torch.stack(shares)
    mean, sem = shares.mean(), shares.std() / trials**0.5
    assert abs(mean - k / m) < 4 * sem, (mean, k / m, sem)
    assert shares.std() > 0.01  # the draws do vary


def test_orthogonal_complement():
    Qk = orthonormal(12, 5, 1).float()
    C = orthogonal_complement(Qk)
    assert C.shape == (12, 7)
    torch.testing.assert_close(C.T @ C, torch.eye(7), atol=1e-5, rtol=0)
    assert (Qk.T @ C).abs().max() < 1e-5
    torch.testing.assert_close(projector(Qk) + projector(C), torch.eye(12, dtype=torch.float64), atol=1e-5, rtol=0)
    assert orthogonal_complement(orthonormal(4, 4, 0).float()).shape == (4, 0)


@pytest.mark.parametrize("shape", [(60, 25), (25, 60)])
@pytest.mark.parametrize("selection", ["top", "random-k", "null"])
def test_chosen_columns_equal_the_full_factorization(shape, selection, block):
    """Asking for some directions gives exactly those columns of the full factorization, on both
    sides, from Δ itself or from a function that reads Δ again; past the numerical rank included."""
    m, n = shape
    M = with_spectrum(m, n, [5.0, 3.0, 2.0, 1.0, 0.5, 0.25], seed=4).float()  # rank 6
    idx = {"top": torch.arange(5), "random-k": torch.tensor([0, 3, 4]), "null": torch.tensor([1, 7, 20])}[selection]
    U, S, V = spectrum.factorize(M, method="gram")
    reads = []

    def load():
        reads.append(1)
        return M.clone()

    for source in (M, load):
        for side, full in (("left", U), ("right", V)):
            reads.clear()
            fac = spectrum.Factorization(source, method="gram")
            torch.testing.assert_close(fac.S, S)
            got = fac.vectors(side, idx)
            if selection == "null":  # completed directions are a basis of the null space, not unique
                past = idx >= 6
                torch.testing.assert_close(got[:, ~past], full[:, idx[~past]])
                Q = torch.cat([full[:, :6], got[:, past]], dim=1).double()
                torch.testing.assert_close(Q.T @ Q, torch.eye(Q.shape[1], dtype=torch.float64), atol=1e-5, rtol=0)
            else:
                torch.testing.assert_close(got, full[:, idx], atol=1e-6, rtol=0)
            recovered = side != fac.direct
            assert len(reads) == (0 if source is M else 1 + recovered)  # read again only to recover


@pytest.mark.parametrize("method", ["gram", "svd"])
def test_released_vectors_cannot_be_asked_for_again(method):
    fac = spectrum.Factorization(with_spectrum(30, 12, [3.0, 2.0, 1.0]).float(), method=method)
    fac.vectors("left", torch.arange(2), release=True)
    with pytest.raises(RuntimeError, match="released"):
        fac.vectors("right", torch.arange(2))


def test_energy_of_directions_is_their_share_of_the_squared_norm():
    M = with_spectrum(40, 20, [4.0, 2.0, 1.0, 0.5]).float()
    for method in ("gram", "svd"):
        fac = spectrum.Factorization(M, method=method)
        assert fac.total == pytest.approx(float(M.double().square().sum()), rel=1e-12)
        assert fac.energy(torch.tensor([0, 2])) == pytest.approx(17.0, rel=1e-5)
        assert fac.energy(torch.arange(20)) == pytest.approx(fac.total, rel=1e-5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_all_finite_finds_any_non_finite_value(bad, dtype):
    x = torch.randn(300, 7).to(dtype)
    assert spectrum.all_finite(x) and spectrum.all_finite(torch.empty(0))
    x[123, 4] = bad
    assert not spectrum.all_finite(x)
    assert spectrum.all_finite(torch.full((10,), torch.finfo(dtype).max, dtype=dtype))  # large, not inf


def test_squared_norm_is_exact_in_float64():
    x = torch.randn(1000, 130)
    assert spectrum.squared_norm(x) == pytest.approx(float(x.double().square().sum()), rel=1e-13)
