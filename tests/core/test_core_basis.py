import json
import os

import pytest
import torch
from safetensors.torch import save_file

import safeproj.core.basis as basis_module
from safeproj.core.basis import Basis, build_basis
from safeproj.core.deltas import TensorDelta
from safeproj.core.projector import energy_share, project
from safeproj.core.spectrum import k_for_energy

Q_NAME = "model.layers.0.self_attn.q_proj.weight"
UP_NAME = "model.layers.0.mlp.up_proj.weight"
DOWN_NAME = "model.layers.0.mlp.down_proj.weight"


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def low_rank(m, n, rank, seed):
    return randn(m, rank, seed=seed) @ randn(rank, n, seed=seed + 100)


@pytest.fixture(scope="module")
def source():
    shapes = {Q_NAME: (24, 24), UP_NAME: (40, 24), DOWN_NAME: (24, 40)}
    start = {n: randn(*s, seed=i) for i, (n, s) in enumerate(shapes.items())}
    # Decaying column scales give the deltas a spread-out spectrum.
    end = {
        n: start[n] + randn(*s, seed=10 + i) * torch.linspace(1, 0.05, s[1]) for i, (n, s) in enumerate(shapes.items())
    }
    return TensorDelta(end, start)


def dense(Q):
    return Q.double() @ Q.double().T


def svd_share(delta, k):
    s2 = torch.linalg.svdvals(delta.double()).square()
    return float(s2[:k].sum() / s2.sum())


@pytest.mark.parametrize("side", ["left", "right"])
def test_top_frac_energy_bookkeeping(source, side):
    basis = build_basis(source, frac=0.25, side=side, progress=False)
    for name, delta in source:
        e = basis[name]
        k = round(0.25 * min(delta.shape))
        factor = e.left if side == "left" else e.right
        assert factor.k == k and (e.right if side == "left" else e.left) is None
        assert e.energy_kept == pytest.approx(svd_share(delta, k), abs=1e-5)
        assert e.energy_kept == pytest.approx(energy_share(delta, e), abs=1e-6)
        assert e.energy_total == pytest.approx(float(delta.double().square().sum()), rel=1e-6)
        torch.testing.assert_close(e.spectrum, torch.linalg.svdvals(delta), atol=1e-4, rtol=1e-5)
        assert basis.meta["tensors"][name]["k"] == k


def test_eta_gives_the_fewest_directions(source):
    basis = build_basis(source, eta=0.8, progress=False)
    for name, delta in source:
        k = basis[name].left.k
        assert basis[name].energy_kept >= 0.8 - 1e-6
        assert svd_share(delta, k - 1) < 0.8
        assert k == k_for_energy(torch.linalg.svdvals(delta), 0.8)


def test_complement_storage_when_more_than_half_is_kept(source):
    basis = build_basis(source, frac=0.75, side="both", progress=False)
    e = basis[Q_NAME]  # 24×24, k = 18 > 12: both sides store the 6-dim complement
    assert e.left.complement and e.right.complement
    assert e.left.Q.shape == (24, 6) and e.left.k == 18
    U, _, Vh = torch.linalg.svd(source.get(Q_NAME).double())
    X = randn(24, 24, seed=5)
    expected = dense(U[:, :18]) @ X.double() @ dense(Vh.T[:, :18])
    torch.testing.assert_close(project(X, e).double(), expected, atol=1e-4, rtol=0)
    # Tall up_proj (40×24), left side: k = 18 <= 20 stays direct; right side (R^24) is a complement.
    up = basis[UP_NAME]
    assert not up.left.complement and up.left.Q.shape == (40, 18)
    assert up.right.complement and up.right.Q.shape == (24, 6)


@pytest.mark.parametrize("side", ["left", "right", "both"])
def test_basis_bytes_stay_below_the_weights(source, side):
    for frac in (0.1, 0.5, 0.75, 1.0):
        basis = build_basis(source, frac=frac, side=side, keep_spectrum=False, progress=False)
        weight_bytes = sum(4 * torch.Size(e.shape).numel() for e in basis.entries.values())
        assert basis.nbytes() <= weight_bytes
        assert basis.meta["bytes_ratio"] == pytest.approx(basis.nbytes() / weight_bytes)
        if frac == 0.5 and side != "both":
            q = basis[Q_NAME]
            assert basis.nbytes() > 0 and (q.left or q.right).Q.numel() <= 0.5 * 24 * 24


def test_rank_deficient_delta_eta_one():
    delta = {UP_NAME: low_rank(40, 24, 3, seed=1)}
    basis = build_basis(TensorDelta(delta, {UP_NAME: torch.zeros(40, 24)}), eta=1.0, side="both", progress=False)
    e = basis[UP_NAME]
    assert e.left.k == e.right.k == 3
    assert e.energy_kept == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("selection", ["random-k", "random"])
def test_seeded_controls(source, selection):
    a = build_basis(source, frac=0.25, selection=selection, seed=3, progress=False)
    b = build_basis(source, frac=0.25, selection=selection, seed=3, progress=False)
    c = build_basis(source, frac=0.25, selection=selection, seed=4, progress=False)
    top = build_basis(source, frac=0.25, progress=False)
    for name in source.names():
        torch.testing.assert_close(a[name].left.Q, b[name].left.Q)
        assert (dense(a[name].left.Q) - dense(c[name].left.Q)).abs().max() > 1e-2
        assert a[name].energy_kept < top[name].energy_kept  # top-k holds the most energy
    assert a.meta["selection"] == selection and a.meta["seed"] == 3


def test_random_k_picks_singular_vectors_on_both_sides(source):
    basis = build_basis(source, frac=0.25, selection="random-k", side="both", seed=1, progress=False)
    delta = source.get(Q_NAME).double()
    e = basis[Q_NAME]
    L, R = e.left.Q.double(), e.right.Q.double()
    # Same singular triplets on both sides: LᵀΔR is diagonal (up to sign) with singular values.
    core = L.T @ delta @ R
    off = core - torch.diag(torch.diagonal(core))
    assert off.abs().max() < 1e-4
    svals = torch.linalg.svdvals(delta)
    for value in torch.diagonal(core).abs():
        assert (svals - value).abs().min() < 1e-4


def test_vector_delta_is_its_own_subspace():
    start = {"model.norm.weight": torch.zeros(8)}
    end = {"model.norm.weight": torch.arange(8.0)}
    basis = build_basis(TensorDelta(end, start, include=r"norm"), frac=0.5, progress=False)
    e = basis["model.norm.weight"]
    assert e.shape == (8,) and e.left.k == 1
    v = torch.arange(8.0, dtype=torch.float64) / torch.arange(8.0).norm()
    torch.testing.assert_close(dense(e.left.Q), torch.outer(v, v), atol=1e-6, rtol=0)
    assert e.energy_kept == pytest.approx(1.0)


def test_save_load_round_trip(source, tmp_path):
    basis = build_basis(source, frac=0.75, side="both", progress=False)
    path = tmp_path / "sub" / "basis.safetensors"
    basis.save(path)
    loaded = Basis.load(path)
    assert loaded.meta == json.loads(json.dumps(basis.meta))
    assert loaded.names() == basis.names()
    for name, e in basis.entries.items():
        f = loaded[name]
        assert f.shape == e.shape and f.energy_kept == e.energy_kept and f.energy_total == e.energy_total
        for side in ("left", "right"):
            assert getattr(f, side).complement == getattr(e, side).complement
            torch.testing.assert_close(getattr(f, side).Q, getattr(e, side).Q, rtol=0, atol=0)
        torch.testing.assert_close(f.spectrum, e.spectrum, rtol=0, atol=0)
    assert loaded.nbytes() == basis.nbytes()
    assert not [p for p in path.parent.iterdir() if p.name != "basis.safetensors"]


def test_validate_names_the_culprit(source):
    basis = build_basis(source, frac=0.25, progress=False)
    shapes = {n: source.shape(n) for n in source.names()}
    basis.validate(shapes)
    with pytest.raises(ValueError, match=f"{UP_NAME}.*not in the model"):
        basis.validate({n: s for n, s in shapes.items() if n != UP_NAME})
    with pytest.raises(ValueError, match=rf"{DOWN_NAME}.*\(24, 40\).*\(24, 41\)"):
        basis.validate({**shapes, DOWN_NAME: (24, 41)})


def test_load_rejects_bad_files(source, tmp_path):
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(ValueError, match="missing.safetensors does not exist"):
        Basis.load(missing)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all")
    with pytest.raises(ValueError, match="cannot read basis file .*junk.safetensors"):
        Basis.load(junk)
    good = tmp_path / "good.safetensors"
    build_basis(source, frac=0.25, progress=False).save(good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated.safetensors"):
        Basis.load(truncated)
    other = tmp_path / "weights.safetensors"
    save_file({"w": torch.ones(2, 2)}, str(other))
    with pytest.raises(ValueError, match="weights.safetensors.*no safeproj basis header"):
        Basis.load(other)


def test_save_is_atomic(source, tmp_path, monkeypatch):
    basis = build_basis(source, frac=0.25, progress=False)
    path = tmp_path / "basis.safetensors"
    basis.save(path)
    before = path.read_bytes()

    def failing_save(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(basis_module, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        build_basis(source, frac=0.5, progress=False).save(path)
    assert path.read_bytes() == before  # the old basis is untouched
    with pytest.raises(OSError):
        basis.save(tmp_path / "new.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["basis.safetensors"]  # no partial or temp file


def test_build_basis_argument_errors(source):
    with pytest.raises(ValueError, match="exactly one of frac and eta"):
        build_basis(source, frac=0.5, eta=0.9, progress=False)
    with pytest.raises(ValueError, match="exactly one of frac and eta"):
        build_basis(source, progress=False)
    with pytest.raises(ValueError, match="frac must be in"):
        build_basis(source, frac=1.5, progress=False)
    with pytest.raises(ValueError, match="eta must be in"):
        build_basis(source, eta=0.0, progress=False)
    with pytest.raises(ValueError, match="selection 'bottom'.*top, random-k, random"):
        build_basis(source, frac=0.5, selection="bottom", progress=False)
    with pytest.raises(ValueError, match="side 'up'.*left, right, both"):
        build_basis(source, frac=0.5, side="up", progress=False)
    with pytest.raises(ValueError, match="method 'qr'.*auto, svd, gram"):
        build_basis(source, frac=0.5, method="qr", progress=False)
    with pytest.raises(ValueError, match="seed must be"):
        build_basis(source, frac=0.5, seed=-1, progress=False)


def test_svd_and_gram_build_the_same_basis(source):
    a = build_basis(source, frac=0.25, side="both", method="svd", progress=False)
    b = build_basis(source, frac=0.25, side="both", method="gram", progress=False)
    assert a.meta["method"] == "svd" and b.meta["method"] == "gram"
    for name in source.names():
        for side in ("left", "right"):
            qa, qb = getattr(a[name], side).Q, getattr(b[name], side).Q
            assert (dense(qa) - dense(qb)).abs().max() < 1e-4
        assert a[name].energy_kept == pytest.approx(b[name].energy_kept, abs=1e-5)


def test_a_tensor_with_zero_delta_is_left_out_and_named():
    """`@paper` takes every stored tensor, and an unchanged norm has Δ = 0: it has no directions to keep."""
    moved = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    delta = TensorDelta({Q_NAME: torch.ones(4, 4), UP_NAME: moved}, {Q_NAME: torch.ones(4, 4), UP_NAME: 0 * moved})
    for kwargs in ({"frac": 0.5}, {"eta": 0.9}, {"frac": 0.5, "selection": "random"}):
        with pytest.warns(UserWarning, match=f"1 tensors have a zero delta.*{Q_NAME}"):
            basis = build_basis(delta, progress=False, **kwargs)
        assert basis.names() == [UP_NAME] and basis.meta["zero_delta"] == [Q_NAME]


def test_all_zero_deltas_are_an_error():
    zero = TensorDelta({Q_NAME: torch.ones(4, 4)}, {Q_NAME: torch.ones(4, 4)})
    for kwargs in ({"frac": 0.5}, {"eta": 0.9}):
        with pytest.raises(ValueError, match=f"every delta is zero.*{Q_NAME}"):
            build_basis(zero, progress=False, **kwargs)


def test_meta_describes_the_build(source):
    basis = build_basis(source, eta=0.9, side="right", selection="top", seed=2, progress=False)
    meta = basis.meta
    assert (meta["side"], meta["selection"], meta["eta"], meta["frac"], meta["seed"]) == ("right", "top", 0.9, None, 2)
    assert meta["source"]["kind"] == "tensors" and len(meta["source"]["sha256"]) == 64
    assert set(meta["tensors"]) == set(source.names())
    assert "safeproj_version" in meta
    json.dumps(meta)


@pytest.mark.parametrize("selection", ["top", "random-k", "random"])
@pytest.mark.parametrize("side", ["left", "right", "both"])
def test_a_source_read_again_builds_what_held_deltas_build(source, selection, side):
    """A DeltaSource lets the build drop Δ and read it again; (name, Δ) pairs are held throughout.
    The two must give the same basis."""
    reread = build_basis(source, frac=0.75, selection=selection, side=side, seed=3, progress=False)
    held = build_basis(list(source), frac=0.75, selection=selection, side=side, seed=3, progress=False)
    for name, e in reread.entries.items():
        for s, f in e.factors().items():
            g = held[name].factors()[s]
            assert f.complement == g.complement
            torch.testing.assert_close(f.Q, g.Q)
        assert e.energy_kept == held[name].energy_kept and e.energy_total == held[name].energy_total
