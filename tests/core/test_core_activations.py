"""Activation statistics on bare tensors: MSO, difference of means, probe, subspace shares, changes."""

from __future__ import annotations

import math

import pytest
import torch

from helpers.activations import basis_with_known_range
from safeproj.core.activations import (
    DEFAULT_ETAS,
    activation_mso,
    change_rows,
    diff_of_means,
    direction_cosine,
    energy_subspace,
    group_split,
    linear_probe,
    subspace_share,
    weight_alignment,
    wilson_interval,
)


def gaussian(n, d, seed, mean=0.0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen) + mean


def test_probe_separates_clusters_and_not_identical_distributions():
    shift = torch.zeros(16)
    shift[3] = 8.0  # Bayes error Φ(−4) ≈ 3e-5
    separated = linear_probe(gaussian(60, 16, 0, shift), gaussian(60, 16, 1))
    assert separated["probe_accuracy"] >= 0.95
    same = [linear_probe(gaussian(200, 8, 10 + s), gaussian(200, 8, 20 + s), seed=s) for s in range(3)]
    accuracies = [r["probe_accuracy"] for r in same]
    assert abs(sum(accuracies) / len(accuracies) - 0.5) < 0.1
    assert max(accuracies) < 0.7
    # chance lies inside the held-out interval of a probe on identical distributions, not of separated ones
    assert any(r["probe_ci_low"] <= 0.5 <= r["probe_ci_high"] for r in same)
    assert separated["probe_ci_low"] > 0.5


def test_probe_holds_out_the_requested_share_of_each_set_and_reports_n():
    h, b = gaussian(128, 8, 0, 0.5), gaussian(128, 8, 1)
    result = linear_probe(h, b)  # half of each set held out by default: 64 per class
    assert result["probe_n_test"] == 128 and result["probe_n_train"] == 128
    quarter = linear_probe(h[:40], b[:20], test_size=0.25)
    assert quarter["probe_n_test"] == 10 + 5 and quarter["probe_n_train"] == 30 + 15
    correct = round(result["probe_accuracy"] * 128)
    assert (result["probe_ci_low"], result["probe_ci_high"]) == wilson_interval(correct, 128)


def test_wilson_interval_known_values():
    # Wilson 95 % for 1/8 is [0.022, 0.471] (the binomial interval quoted for one problem in eight)
    low, high = wilson_interval(1, 8)
    assert low == pytest.approx(0.0224, abs=5e-4) and high == pytest.approx(0.4709, abs=5e-4)
    assert wilson_interval(64, 64)[1] == 1.0 and wilson_interval(64, 64)[0] == pytest.approx(0.9434, abs=5e-4)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_probe_split_is_seeded_and_errors():
    h, u = gaussian(20, 8, 0, 0.5), gaussian(20, 8, 1)
    assert linear_probe(h, u, seed=3) == linear_probe(h, u, seed=3)
    with pytest.raises(ValueError, match="at least 2 prompts per set"):
        linear_probe(h[:1], u)
    with pytest.raises(ValueError, match="some left for training; got 2 harmful"):
        linear_probe(h[:2], u, test_size=0.75)
    with pytest.raises(ValueError, match=r"test_size must be in \(0, 1\), got 1"):
        linear_probe(h, u, test_size=1)


def test_mso_of_identical_sets_is_one():
    x = gaussian(12, 32, 0, 0.3)
    for center in (False, True):
        rows = activation_mso(x, x.clone(), DEFAULT_ETAS, center=center)
        assert [r["eta"] for r in rows] == list(DEFAULT_ETAS)
        for r in rows:
            assert r["mso"] == pytest.approx(1.0, abs=1e-5)
            assert r["k_harmful"] == r["k_benign"]
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
    assert r["k_harmful"] == r["k_benign"] == 4
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
        {"step": s, "layer": 1, "diff_norm": d, "probe_accuracy": p, "probe_n_test": 64, "probe_ci_low": 0.5,
         "k_o_proj": 3}
        for s, d, p in ((0, 1.0, 0.6), (5, 1.5, 0.8), (9, 2.5, 0.9))
    ]  # fmt: skip
    mso_rows = [
        {"step": s, "layer": 1, "centered": c, "eta": 0.5, "mso": m + 0.1 * c, "baseline": 0.05}
        for s, m in ((0, 0.2), (5, 0.3), (9, 0.5))
        for c in (False, True)
    ]
    rows = {r["metric"]: r for r in change_rows(layer_rows, mso_rows)}
    assert set(rows) == {
        "diff_norm", "probe_accuracy", "mso_uncentered@0.5", "mso_uncentered_baseline@0.5", "mso_centered@0.5",
        "mso_centered_baseline@0.5",
    }  # fmt: skip
    assert rows["diff_norm"]["first"] == 1.0 and rows["diff_norm"]["last"] == 2.5
    assert rows["probe_accuracy"]["change"] == pytest.approx(0.3)
    assert rows["mso_uncentered@0.5"]["change"] == pytest.approx(0.3)
    assert rows["mso_centered@0.5"]["last"] == pytest.approx(0.6)
    assert rows["mso_centered_baseline@0.5"]["first"] == 0.05
    assert rows["diff_norm"]["first_step"] == 0 and rows["diff_norm"]["last_step"] == 9


@pytest.mark.parametrize("frac", [0.25, 0.75])  # 0.75 stores the complement
def test_weight_alignment_with_a_real_basis(frac):
    basis, u = basis_with_known_range(frac)
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


def _acts(n_acts, per_act, d, seed):
    """Rows whose only structure is their act: a random centre per act plus small noise."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_acts, d, generator=gen) * 3
    rows = centres.repeat_interleave(per_act, dim=0) + 0.3 * torch.randn(n_acts * per_act, d, generator=gen)
    return rows, [f"act{i}" for i in range(n_acts) for _ in range(per_act)]


def test_group_split_holds_out_whole_groups_per_class():
    labels = [1] * 40 + [0] * 40
    groups = [f"h{i // 5}" for i in range(40)] + [f"b{i // 10}" for i in range(40)]
    train, test = group_split(labels, groups, 0.5, seed=1)
    assert sorted(train + test) == list(range(80))
    assert not {groups[i] for i in train} & {groups[i] for i in test}
    for label in (0, 1):
        held = sum(labels[i] == label for i in test)
        assert 10 <= held <= 30  # about half of each class, in whole groups
    assert group_split(labels, groups, 0.5, seed=1) == (train, test)
    with pytest.raises(ValueError, match="class 0 has 1 group"):
        group_split(labels, groups[:40] + ["b"] * 40, 0.5)


def test_probe_split_by_act_sees_through_act_memorisation():
    # Harmful and benign rows differ only by which act they come from: a prompt-level split lets the probe
    # recognise acts it trained on; holding out whole acts leaves it at chance.
    harmful, harmful_acts = _acts(8, 12, 32, seed=0)
    benign, benign_acts = _acts(8, 12, 32, seed=1)
    by_prompt = linear_probe(harmful, benign)
    by_act = [linear_probe(harmful, benign, seed=s, groups=(harmful_acts, benign_acts)) for s in range(4)]
    assert by_prompt["probe_accuracy"] > 0.95 and by_prompt["probe_test_groups"] == 0
    assert sum(r["probe_accuracy"] for r in by_act) / len(by_act) < 0.75
    assert all(r["probe_test_groups"] >= 2 for r in by_act)
