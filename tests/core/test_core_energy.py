"""Energy retained by P_k: bookkeeping, the controls, and one SVD per tensor."""

from __future__ import annotations

import math

import pytest
import torch

from helpers.overlap import gaussian, llama_shapes, orthonormal, with_columns, zeros_like
from safeproj.core import spectrum as core_spectrum
from safeproj.core.deltas import TensorDelta
from safeproj.core.energy import energy_retained
from safeproj.core.factors import BasisEntry, Factor
from safeproj.core.options import FRACS, SELECTIONS
from safeproj.core.projector import energy_share


def delta(tensors: dict) -> TensorDelta:
    return TensorDelta(tensors, zeros_like(tensors))


def tensor_rows(rows, **match):
    return [r for r in rows if r["scope"] == "tensor" and all(r[k] == v for k, v in match.items())]


def pooled(rows, frac, selection):
    return next(r for r in rows if r["scope"] == "pooled" and r["frac"] == frac and r["selection"] == selection)


def low_rank_pair(seed: int = 0):
    """A basis delta and an update sharing a 4-dimensional column space, plus a little noise."""
    basis, update = {}, {}
    for i, (name, (m, n)) in enumerate(llama_shapes(1).items()):
        U = orthonormal(m, 4, seed + i)
        noise = gaussian({"x": (m, n)}, seed=100 + i, scale=1e-3)["x"]
        basis[name] = with_columns(U, [4.0, 3.0, 2.0, 1.0], n, seed=200 + i) + noise
        update[name] = with_columns(U, [1.0, 1.0, 1.0, 1.0], n, seed=300 + i) + noise.flip(0)
    return basis, update


def test_top_k_at_frac_one_keeps_a_delta_whole():
    tensors = gaussian(llama_shapes(1), seed=1)  # includes tall 48×32 matrices: k = 32 < d = 48
    rows = energy_retained(delta(tensors), delta(dict(tensors)), fracs=[1.0], selections=["top", "random-k"])
    for row in tensor_rows(rows):
        assert row["share"] == pytest.approx(1.0, abs=1e-5), row["name"]
    assert pooled(rows, 1.0, "top")["share"] == pytest.approx(1.0, abs=1e-5)


def test_top_k_beats_the_random_controls_on_a_low_rank_delta():
    basis, update = low_rank_pair()
    rows = energy_retained(delta(basis), delta(update), fracs=FRACS, selections=SELECTIONS, seed=0)
    for frac in FRACS:
        for row in tensor_rows(rows, frac=frac, selection="top"):
            for control in ("random-k", "random"):
                other = tensor_rows(rows, frac=frac, selection=control, name=row["name"])[0]
                assert row["share"] >= other["share"] - 1e-3  # equal once both hold the 4 shared directions
        top = pooled(rows, frac, "top")["share"]
        assert top >= pooled(rows, frac, "random-k")["share"] and top >= pooled(rows, frac, "random")["share"]
    assert pooled(rows, 0.25, "top")["share"] > 0.99  # k >= 4 directions hold the shared column space
    assert pooled(rows, 0.25, "random")["share"] < 0.6


def test_pooled_share_is_the_energy_weighted_mean():
    basis = gaussian(llama_shapes(1), seed=1)
    update = {n: t * (i + 1) for i, (n, t) in enumerate(gaussian(llama_shapes(1), seed=2).items())}
    rows = energy_retained(delta(basis), delta(update), fracs=[0.25, 0.5], seed=3)
    for frac in (0.25, 0.5):
        for selection in SELECTIONS:
            members = tensor_rows(rows, frac=frac, selection=selection)
            assert len(members) == len(update)
            total = sum(r["total"] for r in members)
            assert total == pytest.approx(sum(float(t.double().square().sum()) for t in update.values()), rel=1e-6)
            weighted = sum(r["share"] * r["total"] for r in members) / total
            got = pooled(rows, frac, selection)
            assert got["share"] == pytest.approx(weighted, rel=1e-9)
            assert got["kept"] == pytest.approx(sum(r["kept"] for r in members), rel=1e-9)
            assert got["random_share"] == pytest.approx(
                sum(r["random_share"] * r["total"] for r in members) / total, rel=1e-9
            )


def test_random_controls_match_core_selection_and_are_seeded():
    basis = gaussian(llama_shapes(1), seed=1)
    update = gaussian(llama_shapes(1), seed=2)
    rows = energy_retained(delta(basis), delta(update), fracs=[0.5], seed=7)
    name = "model.layers.0.mlp.gate_proj.weight"
    m, n = basis[name].shape
    k = core_spectrum.k_for_frac(0.5, m, n)
    Q, _ = core_spectrum.side_spectrum(basis[name])
    for selection in ("random", "random-k"):
        Qk = core_spectrum.select_vectors(Q, k, selection, seed=7, shape=(m, n), side="left", name=name)
        entry = BasisEntry(name, (m, n), Factor(Qk), None, float("nan"), float("nan"))
        row = tensor_rows(rows, name=name, selection=selection)[0]
        assert row["k"] == k
        assert row["share"] == pytest.approx(energy_share(update[name], entry), rel=1e-5)
    again = energy_retained(delta(basis), delta(update), fracs=[0.5], seed=7)
    other = energy_retained(delta(basis), delta(update), fracs=[0.5], seed=8)
    shares = lambda rs, sel: [r["share"] for r in tensor_rows(rs, selection=sel)]  # noqa: E731
    assert shares(rows, "random-k") == shares(again, "random-k")
    assert shares(rows, "random") != shares(other, "random")


def test_one_svd_per_tensor_for_every_frac_and_selection(spectrum_calls):
    basis = gaussian(llama_shapes(1), seed=1)
    energy_retained(delta(basis), delta(gaussian(llama_shapes(1), seed=2)), fracs=FRACS, selections=SELECTIONS)
    assert len(spectrum_calls) == len(basis)


def test_zero_update_tensor_has_no_share_and_does_not_move_the_pool():
    basis = gaussian(llama_shapes(1), seed=1)
    update = gaussian(llama_shapes(1), seed=2)
    rows = energy_retained(delta(basis), delta(update), fracs=[0.5], selections=["top"])
    update["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 32)
    zeroed = energy_retained(delta(basis), delta(update), fracs=[0.5], selections=["top"])
    assert math.isnan(tensor_rows(zeroed, name="model.layers.0.self_attn.k_proj.weight")[0]["share"])
    kept = sum(r["kept"] for r in tensor_rows(rows) if "k_proj" not in r["name"])
    total = sum(r["total"] for r in tensor_rows(rows) if "k_proj" not in r["name"])
    assert pooled(zeroed, 0.5, "top")["share"] == pytest.approx(kept / total, rel=1e-9)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fracs": [0.0]}, "frac"),
        ({"fracs": [1.2]}, "frac"),
        ({"fracs": []}, "frac"),
        ({"selections": ["best"]}, "selection"),
    ],
)
def test_bad_grid_is_refused(kwargs, match):
    tensors = gaussian(llama_shapes(1), seed=1)
    with pytest.raises(ValueError, match=match):
        energy_retained(delta(tensors), delta(tensors), **kwargs)
