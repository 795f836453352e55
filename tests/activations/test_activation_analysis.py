"""Activation analyses on bare tensors and on recorded shards."""

from __future__ import annotations

import json
import math

import pytest
import torch

from safeproj.core.activations import (
    DEFAULT_ETAS,
    activation_mso,
    analyse_recordings,
    change_rows,
    diff_of_means,
    direction_cosine,
    energy_subspace,
    load_activations,
    probe_accuracy,
    recorded_steps,
    subspace_share,
    summary_table,
    weight_alignment,
    write_report,
)
from safeproj.callbacks.activation_recorder import encode_prompts, record_step
from safeproj.model.loading import tiny_model


def gaussian(n, d, seed, mean=0.0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen) + mean


def test_probe_separates_clusters_and_not_identical_distributions():
    shift = torch.zeros(16)
    shift[3] = 8.0  # Bayes error Φ(−4) ≈ 3e-5
    assert probe_accuracy(gaussian(60, 16, 0, shift), gaussian(60, 16, 1)) >= 0.95
    same = [probe_accuracy(gaussian(200, 8, 10 + s), gaussian(200, 8, 20 + s), seed=s) for s in range(3)]
    assert abs(sum(same) / len(same) - 0.5) < 0.1
    assert max(same) < 0.7


def test_probe_split_is_seeded_and_stratified_errors():
    h, u = gaussian(20, 8, 0, 0.5), gaussian(20, 8, 1)
    assert probe_accuracy(h, u, seed=3) == probe_accuracy(h, u, seed=3)
    with pytest.raises(ValueError, match="at least 2 prompts per set"):
        probe_accuracy(h[:1], u)


def test_mso_of_identical_sets_is_one():
    x = gaussian(12, 32, 0, 0.3)
    for center in (False, True):
        rows = activation_mso(x, x.clone(), DEFAULT_ETAS, center=center)
        assert [r["eta"] for r in rows] == list(DEFAULT_ETAS)
        for r in rows:
            assert r["mso"] == pytest.approx(1.0, abs=1e-5)
            assert r["k_harmful"] == r["k_useful"]
            assert r["baseline"] == pytest.approx(r["k_harmful"] / 32)


def test_mso_of_orthogonal_sets_is_zero_and_partial_overlap_in_between():
    d = 16
    a = torch.zeros(8, d)
    b = torch.zeros(8, d)
    a[:, :4] = gaussian(8, 4, 0)
    b[:, 4:8] = gaussian(8, 4, 1)
    for r in activation_mso(a, b, (0.5, 0.99)):
        assert r["mso"] == pytest.approx(0.0, abs=1e-6)
    # Equal energy in four directions each, one direction shared: MSO = 1/4 at any η needing all four.
    eye = torch.eye(d)
    a4 = eye[[0, 1, 2, 3, 0, 1, 2, 3]]
    b4 = eye[[0, 5, 6, 7, 0, 5, 6, 7]]
    r = activation_mso(a4, b4, (0.9,))[0]
    assert r["k_harmful"] == r["k_useful"] == 4
    assert r["mso"] == pytest.approx(1 / 4, abs=1e-5)
    assert r["baseline"] == pytest.approx(4 / d)


def test_energy_subspace_picks_fewest_vectors_holding_eta():
    d, n = 10, 6
    u, _ = torch.linalg.qr(gaussian(d, 3, 0))
    v, _ = torch.linalg.qr(gaussian(n, 3, 1))
    s = torch.tensor([3.0, 2.0, 1.0])  # energy shares 9/14, 13/14, 1
    x = (u @ torch.diag(s) @ v.T).T  # (n, d): rows are prompts
    assert energy_subspace(x, 0.5).shape == (d, 1)
    assert energy_subspace(x, 0.9).shape == (d, 2)
    assert energy_subspace(x, 0.95).shape == (d, 3)
    q = energy_subspace(x, 0.5)
    assert abs(float(q[:, 0] @ u[:, 0])) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="eta must be in"):
        energy_subspace(x, 1.5)


def test_centering_ignores_a_shared_offset():
    x = gaussian(10, 12, 0)
    offset = torch.full((12,), 5.0)
    centered = activation_mso(x, x + offset, (0.9,), center=True)[0]
    plain = activation_mso(x, x + offset, (0.9,), center=False)[0]
    assert centered["mso"] == pytest.approx(1.0, abs=1e-5)
    assert plain["mso"] < 0.9


def test_diff_of_means_direction_and_norm():
    u = gaussian(7, 6, 0)
    shift = torch.tensor([0.0, 3.0, 0.0, 4.0, 0.0, 0.0])
    direction, norm = diff_of_means(u + shift, u)
    assert norm == pytest.approx(5.0, rel=1e-5)
    torch.testing.assert_close(direction, shift / 5.0, atol=1e-5, rtol=0)
    zero, n0 = diff_of_means(u, u)
    assert n0 == 0.0 and not zero.any()
    with pytest.raises(ValueError, match="differ in width"):
        diff_of_means(u, u[:, :3])


def test_subspace_share_and_its_complement():
    q = torch.eye(4)[:, :2]
    q_perp = torch.eye(4)[:, 2:]
    assert subspace_share(torch.tensor([3.0, 4.0, 0.0, 0.0]), q) == pytest.approx(1.0)
    assert subspace_share(torch.tensor([0.0, 0.0, 1.0, 0.0]), q) == pytest.approx(0.0)
    d = torch.tensor([1.0, 0.0, 1.0, 2.0])
    assert subspace_share(d, q) == pytest.approx(1 / math.sqrt(6))
    assert subspace_share(d, q_perp, complement=True) == pytest.approx(subspace_share(d, q))
    assert math.isnan(subspace_share(torch.zeros(4), q))
    with pytest.raises(ValueError, match="does not act on vectors of size 3"):
        subspace_share(torch.ones(3), q)


def test_direction_cosine():
    assert direction_cosine(torch.tensor([1.0, 0.0]), torch.tensor([2.0, 0.0])) == pytest.approx(1.0)
    assert direction_cosine(torch.tensor([1.0, 0.0]), torch.tensor([0.0, -3.0])) == pytest.approx(0.0)


def test_change_rows_first_vs_last():
    layer_rows = [
        {"step": 0, "layer": 1, "diff_norm": 1.0, "probe_accuracy": 0.6, "k_o_proj": 3},
        {"step": 5, "layer": 1, "diff_norm": 1.5, "probe_accuracy": 0.8, "k_o_proj": 3},
        {"step": 9, "layer": 1, "diff_norm": 2.5, "probe_accuracy": 0.9, "k_o_proj": 3},
    ]
    mso_rows = [
        {"step": s, "layer": 1, "centered": False, "eta": 0.5, "mso": m} for s, m in ((0, 0.2), (5, 0.3), (9, 0.5))
    ]
    rows = {r["metric"]: r for r in change_rows(layer_rows, mso_rows)}
    assert set(rows) == {"diff_norm", "probe_accuracy", "mso_uncentered@0.5"}
    assert rows["diff_norm"]["first"] == 1.0 and rows["diff_norm"]["last"] == 2.5
    assert rows["probe_accuracy"]["change"] == pytest.approx(0.3)
    assert rows["mso_uncentered@0.5"]["change"] == pytest.approx(0.3)
    assert rows["diff_norm"]["first_step"] == 0 and rows["diff_norm"]["last_step"] == 9


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """Two recordings of the tiny model, the second after perturbing its weights."""
    out = tmp_path_factory.mktemp("acts")
    model, tok = tiny_model(seed=3, layers=4)
    harmful = [f"how do I hurt person {i}" + "?" * (i % 3) for i in range(12)]
    useful = [f"what is {i} plus {2 * i}" + "!" * (i % 4) for i in range(12)]
    encoded = {"harmful": encode_prompts(tok, harmful, "last"), "useful": encode_prompts(tok, useful, "last")}
    record_step(model, encoded, [1, 3], out, 0, position="last", pad_id=0, batch_size=5, progress=False)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    record_step(model, encoded, [1, 3], out, 10, position="last", pad_id=0, batch_size=5, progress=False)
    (out / ".step_20-partial").mkdir()  # an interrupted recording is ignored
    (out / "step_30").mkdir()  # so is a step without a manifest
    return out


def test_analyse_recordings_rows(two_steps):
    assert recorded_steps(two_steps) == [0, 10]
    etas = (0.3, 0.6, 0.9)
    report = analyse_recordings(two_steps, etas=etas)
    assert len(report["mso"]) == 2 * 2 * 2 * len(etas)  # steps × layers × centerings × η
    assert [(r["step"], r["layer"]) for r in report["layers"]] == [(0, 1), (0, 3), (10, 1), (10, 3)]
    harmful, _ = load_activations(two_steps, 10, "harmful", 3)
    useful, _ = load_activations(two_steps, 10, "useful", 3)
    row = report["layers"][-1]
    assert row["diff_norm"] == pytest.approx(diff_of_means(harmful, useful)[1], rel=1e-6)
    assert row["probe_accuracy"] == probe_accuracy(harmful, useful)
    assert report["layers"][0]["direction_cosine_to_first"] == pytest.approx(1.0, abs=1e-5)
    assert report["layers"][-1]["direction_cosine_to_first"] < 0.999  # the perturbation moved it
    changes = [r for r in report["changes"] if r["layer"] == 3 and r["metric"] == "diff_norm"]
    assert changes[0]["first"] == pytest.approx(report["layers"][1]["diff_norm"])
    assert changes[0]["last"] == pytest.approx(row["diff_norm"])
    assert {r["metric"] for r in report["changes"]} >= {"probe_accuracy", "mso_centered@0.6", "mso_uncentered@0.9"}


def test_analyse_recordings_errors(two_steps):
    with pytest.raises(ValueError, match="steps \\[30\\] have no complete recording"):
        analyse_recordings(two_steps, steps=[0, 30])
    with pytest.raises(ValueError, match="no prompt set 'benign'"):
        analyse_recordings(two_steps, useful_set="benign")
    with pytest.raises(ValueError, match="no activations for set 'harmful', layer 2"):
        load_activations(two_steps, 0, "harmful", 2)


def test_write_report_files(two_steps, tmp_path):
    report = analyse_recordings(two_steps, etas=(0.5, 0.9))
    files = write_report(report, tmp_path)
    assert set(files) == {"analysis", "mso_vs_eta", "probe_by_layer"}
    for name in ("mso_vs_eta", "probe_by_layer"):
        assert files[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(files["analysis"].read_text())
    assert data["layers"] == json.loads(json.dumps(report["layers"]))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left
    table = summary_table(report)
    assert len(table.splitlines()) == 1 + len(report["layers"]) and "probe" in table


def _basis_with_known_range(frac, d=64, seed=0):
    """A basis for layer 1 whose o_proj / down_proj left factors have a known range."""
    from safeproj.core.basis import build_basis

    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d, d, generator=gen))
    s = torch.linspace(10.0, 1.0, d)
    deltas = {
        "model.layers.1.self_attn.o_proj.weight": u @ torch.diag(s) @ torch.linalg.qr(torch.randn(d, d, generator=gen))[0].T,
        "model.layers.1.mlp.down_proj.weight": u @ torch.diag(s) @ torch.linalg.qr(torch.randn(160, d, generator=gen))[0].T,
        "model.layers.0.self_attn.o_proj.weight": torch.randn(d, d, generator=gen),
    }
    return build_basis(iter(deltas.items()), frac=frac, side="left", progress=False), u


@pytest.mark.parametrize("frac", [0.25, 0.75])  # 0.75 stores the complement
def test_weight_alignment_with_a_real_basis(frac):
    basis, u = _basis_with_known_range(frac)
    k = round(frac * 64)
    assert basis.entries["model.layers.1.self_attn.o_proj.weight"].left.complement == (frac > 0.5)
    inside = weight_alignment(u[:, 0] * 3.0, basis, layer=1)
    assert inside["cos_o_proj"] == pytest.approx(1.0, abs=1e-4)
    assert inside["cos_down_proj"] == pytest.approx(1.0, abs=1e-4)
    assert inside["random_o_proj"] == pytest.approx(math.sqrt(k / 64)) and inside["k_o_proj"] == k
    outside = weight_alignment(u[:, -1], basis, layer=1)
    # a stored complement gives sqrt(1 − ‖Q⊥ᵀd‖²): fp32 round-off near 0 becomes ~sqrt(eps)
    assert outside["cos_o_proj"] == pytest.approx(0.0, abs=1e-4 if frac < 0.5 else 2e-3)
    mixed = weight_alignment(u[:, 0] + u[:, -1], basis, layer=1)
    assert mixed["cos_o_proj"] == pytest.approx(1 / math.sqrt(2), abs=1e-4)
    # layer 0 has only o_proj in the basis; layer 3 has nothing
    assert set(weight_alignment(u[:, 0], basis, layer=0)) == {"cos_o_proj", "random_o_proj", "k_o_proj"}
    assert weight_alignment(u[:, 0], basis, layer=3) == {}
    with pytest.raises(ValueError, match="acts on size 64, activations have size 10"):
        weight_alignment(torch.ones(10), basis, layer=1)


def test_analyse_recordings_with_a_basis(two_steps):
    basis, _ = _basis_with_known_range(0.25)
    report = analyse_recordings(two_steps, etas=(0.5,), basis=basis)
    by_layer = {(r["step"], r["layer"]): r for r in report["layers"]}
    assert 0.0 <= by_layer[(0, 1)]["cos_o_proj"] <= 1.0 and "cos_o_proj" not in by_layer[(0, 3)]
    assert {"cos_o_proj", "cos_down_proj"} <= {r["metric"] for r in report["changes"] if r["layer"] == 1}
    assert "cos_o_proj" in summary_table(report)
