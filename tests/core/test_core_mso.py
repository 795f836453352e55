"""MSO tables on deltas whose overlap is known, SVD reuse, aggregation, errors."""

from __future__ import annotations

import math

import pytest
import torch

from helpers.overlap import gaussian, llama_shapes, orthonormal, with_columns, zeros_like
from safeproj.commands.overlap import summary_lines
from safeproj.core.deltas import TensorDelta
from safeproj.core.options import ETAS
from safeproj.core.overlap import aggregate, mso_table, mso_tables
from safeproj.core.spectra import SpectrumCache

ALL = [r".*"]


def delta(tensors: dict, include=None) -> TensorDelta:
    return TensorDelta(tensors, zeros_like(tensors), include=include)


def decaying(k: int) -> list[float]:
    return [2.0**-i for i in range(k)]


def test_same_delta_overlaps_fully_at_every_eta():
    tensors = gaussian(llama_shapes(), seed=3)
    # Two source objects with the same content: each computes its own spectrum.
    rows = mso_table(delta(tensors), delta(dict(tensors)))
    assert len(rows) == len(tensors) * len(ETAS)
    for row in rows:
        assert row["k_v"] == row["k_w"]
        assert row["mso"] == pytest.approx(1.0, abs=1e-5)
        assert row["angle_deg"] == pytest.approx(0.0, abs=0.5)
        assert row["baseline"] == pytest.approx(row["k_v"] / row["d"])
        assert row["ratio"] == pytest.approx(row["mso"] / row["baseline"])


def test_orthogonal_column_spaces_do_not_overlap():
    d, n = 40, 30
    U = orthonormal(d, 20, seed=0)
    v = {"model.layers.0.self_attn.q_proj.weight": with_columns(U[:, :10], decaying(10), n, seed=1)}
    w = {"model.layers.0.self_attn.q_proj.weight": with_columns(U[:, 10:], decaying(10), n, seed=2)}
    rows = mso_table(delta(v), delta(w))
    for row in rows:
        assert row["mso"] == pytest.approx(0.0, abs=1e-6)
        assert row["angle_deg"] == pytest.approx(90.0, abs=0.1)
        assert row["baseline"] > 0 and row["ratio"] == pytest.approx(0.0, abs=1e-4)


def test_nested_subspaces_overlap_fully():
    # V's singular directions are the leading directions of W, in the same order, so at every η one
    # top-k subspace contains the other.
    d, n = 40, 30
    U = orthonormal(d, 12, seed=4)
    name = "model.layers.1.mlp.down_proj.weight"
    v = {name: with_columns(U[:, :4], [3.0, 2.0, 1.5, 1.0], n, seed=5)}
    w = {name: with_columns(U, decaying(12), n, seed=6)}
    rows = mso_table(delta(v, ALL), delta(w, ALL), etas=[0.1, 0.3, 0.5, 0.7, 0.9, 1.0])
    assert any(r["k_v"] != r["k_w"] for r in rows)
    for row in rows:
        assert row["mso"] == pytest.approx(1.0, abs=1e-5)


def test_random_deltas_sit_near_the_baseline():
    shapes = {f"model.layers.{i}.self_attn.o_proj.weight": (96, 96) for i in range(6)}
    rows = mso_table(delta(gaussian(shapes, seed=7)), delta(gaussian(shapes, seed=8)), etas=[0.5, 0.7, 0.9])
    for row in aggregate(rows, "model"):
        assert row["ratio"] == pytest.approx(1.0, abs=0.12), row
    # One subspace against a much larger unrelated one: still the baseline, not 0 or 1.
    assert all(0.0 < r["mso"] < 1.0 for r in rows)


def test_one_svd_per_tensor_per_source_for_the_whole_grid(spectrum_calls):
    tensors_v, tensors_w = gaussian(llama_shapes(), seed=1), gaussian(llama_shapes(), seed=2)
    rows = mso_table(delta(tensors_v), delta(tensors_w), etas=ETAS)
    assert len(rows) == len(tensors_v) * len(ETAS)
    assert len(spectrum_calls) == 2 * len(tensors_v)

    spectrum_calls.clear()
    same = delta(tensors_v)
    mso_table(same, same, etas=ETAS)  # one object on both sides: one SVD per tensor
    assert len(spectrum_calls) == len(tensors_v)

    spectrum_calls.clear()
    tables = mso_tables(delta(tensors_v), {"x": delta(tensors_w), "y": delta(tensors_w)}, etas=ETAS)
    assert set(tables) == {"x", "y"} and len(tables["y"]) == len(rows)
    assert len(spectrum_calls) == 3 * len(tensors_v)


def test_cache_releases_each_tensor_after_use():
    tensors = gaussian(llama_shapes(1), seed=1)
    cache = SpectrumCache()
    mso_table(delta(tensors), delta(dict(tensors)), etas=[0.5], cache=cache)
    assert cache._memory == {}
    assert cache.computed == 2 * len(tensors)


def test_on_disk_cache_skips_the_svd_next_time(tmp_path, checkpoint_pair):
    from safeproj.core.deltas import delta_from_spec

    a, b = (delta_from_spec(s) for s in checkpoint_pair)
    first = SpectrumCache(cache_dir=tmp_path / "spectra")
    rows1 = mso_table(a, b, etas=[0.3, 0.8], cache=first)
    second = SpectrumCache(cache_dir=tmp_path / "spectra")
    a2, b2 = (delta_from_spec(s) for s in checkpoint_pair)  # new objects, same files
    rows2 = mso_table(a2, b2, etas=[0.3, 0.8], cache=second)
    assert first.computed == 2 * len(a.names()) and first.loaded == 0
    assert second.computed == 0 and second.loaded == 2 * len(a.names())
    assert [r["mso"] for r in rows1] == [r["mso"] for r in rows2]


def test_aggregation_by_layer_and_module():
    shapes = llama_shapes(2)
    shapes["model.player.q_proj.weight"] = (32, 32)  # not a layer, but a q projection
    shapes["model.layers_norm.weight"] = (32,)
    rows = mso_table(delta(gaussian(shapes, seed=1), ALL), delta(gaussian(shapes, seed=2), ALL), etas=[0.4, 0.8])
    by_layer = aggregate(rows, "layer")
    assert {r["layer"] for r in by_layer} == {0, 1}
    assert all(r["tensors"] == 7 for r in by_layer)
    by_module = {(r["module"], r["eta"]): r for r in aggregate(rows, "module")}
    assert by_module[("q", 0.4)]["tensors"] == 3
    assert by_module[("layers_norm", 0.8)]["tensors"] == 1
    order = [r["module"] for r in aggregate(rows, "module") if r["eta"] == 0.4]
    assert order == ["q", "k", "v", "o", "gate", "up", "down", "layers_norm"]
    for eta in (0.4, 0.8):
        members = [r for r in rows if r["layer"] == 1 and r["eta"] == eta]
        got = next(r for r in by_layer if r["layer"] == 1 and r["eta"] == eta)
        mean_mso = sum(r["mso"] for r in members) / len(members)
        mean_base = sum(r["baseline"] for r in members) / len(members)
        assert got["mso"] == pytest.approx(mean_mso)
        assert got["ratio"] == pytest.approx(mean_mso / mean_base)
        model = next(r for r in aggregate(rows, "model") if r["eta"] == eta)
        assert model["tensors"] == len(shapes)
        assert model["baseline"] == pytest.approx(sum(r["baseline"] for r in rows if r["eta"] == eta) / len(shapes))
    lines = summary_lines(rows)
    assert lines[0].split()[:3] == ["module", "eta", "tensors"]
    assert any(line.startswith("model") for line in lines)


def test_module_filter_keeps_only_those_types():
    tensors = gaussian(llama_shapes(), seed=1)
    rows = mso_table(delta(tensors), delta(dict(tensors)), etas=[0.5], modules=["q", "down"])
    assert {r["module"] for r in rows} == {"q", "down"} and len(rows) == 4


@pytest.mark.parametrize("eta", [0.0, -0.1, 1.5, math.nan])
def test_eta_outside_unit_interval_is_refused(eta):
    tensors = gaussian(llama_shapes(1), seed=1)
    with pytest.raises(ValueError, match="eta"):
        mso_table(delta(tensors), delta(tensors), etas=[0.5, eta])


def test_shape_mismatch_names_the_tensor():
    a = gaussian(llama_shapes(1), seed=1)
    b = dict(a)
    b["model.layers.0.mlp.up_proj.weight"] = torch.randn(32, 48)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj\.weight"):
        mso_table(delta(a), delta(b))


def test_deltas_of_different_models_are_refused():
    a = gaussian(llama_shapes(1), seed=1)
    b = {name.replace("model.layers", "transformer.h"): t for name, t in a.items()}
    b = {name.replace("self_attn", "attn"): t for name, t in b.items() if "self_attn" in name}
    with pytest.raises(ValueError, match="no tensor in common"):
        mso_table(delta(a), delta(b))


def test_partly_shared_tensors_warn_and_compare_the_shared_ones():
    a = gaussian(llama_shapes(1), seed=1)
    b = {n: t for n, t in a.items() if "self_attn" in n}
    with pytest.warns(UserWarning, match="only one delta"):
        rows = mso_table(delta(a), delta(b), etas=[0.5])
    assert len(rows) == 4


def test_unknown_module_filter_lists_known_types():
    tensors = gaussian(llama_shapes(1), seed=1)
    with pytest.raises(ValueError, match=r"'qq'.*q, k, v, o, gate, up, down"):
        mso_table(delta(tensors), delta(tensors), modules=["qq"])


def test_all_zero_delta_names_the_tensor():
    a = gaussian(llama_shapes(1), seed=1)
    b = dict(a)
    b["model.layers.0.self_attn.v_proj.weight"] = torch.zeros(16, 32)
    with pytest.raises(ValueError, match=r"v_proj\.weight is all zero"):
        mso_table(delta(a), delta(b))


def test_right_side_lives_in_the_input_space():
    tensors = gaussian(llama_shapes(1), seed=1)
    rows = mso_table(delta(tensors), delta(gaussian(llama_shapes(1), seed=2)), etas=[0.5], side="right")
    d = {r["name"]: r["d"] for r in rows}
    assert d["model.layers.0.mlp.down_proj.weight"] == 48 and d["model.layers.0.mlp.up_proj.weight"] == 32
    with pytest.raises(ValueError, match="side"):
        mso_table(delta(tensors), delta(tensors), side="both")
