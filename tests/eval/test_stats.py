"""Nested, paired bootstrap effect sizes: retention arithmetic, pairing, coverage on simulated seeds × prompts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from safeproj.eval.stats import Effect, nested_bootstrap, paired_effect, retention, retention_effect, verdict


def test_retention_arithmetic():
    assert retention(3.0, 1.0, 1.0) == 1.0  # the full fine-tune retains all of its own change
    assert retention(3.0, 1.0, 3.0) == 0.0  # the start model none
    assert retention(3.0, 1.0, 2.5) == pytest.approx(0.25)
    assert retention(-1.0, 1.0, 0.5) == pytest.approx(0.75)  # rising metrics (the comply margin) alike
    assert retention(1.0, 1.0, 0.0) != retention(1.0, 1.0, 0.0)  # NaN: no change to retain
    np.testing.assert_allclose(retention(np.array([2.0, 4.0]), np.array([0.0, 2.0]), np.array([1.0, 4.0])), [0.5, 0.0])


def test_verdict_names_the_sign_or_says_inconclusive():
    assert verdict(0.1, 0.3) == "positive"
    assert verdict(-0.3, -0.1) == "negative"
    assert verdict(-0.1, 0.3) == "inconclusive"
    assert verdict(math.nan, 0.3) == "inconclusive"
    effect = Effect("d", 0.2, -0.1, 0.5, n_seeds=3, n_items=(64,))
    assert effect.verdict == "inconclusive" and effect.as_dict()["n_items"] == [64]


def test_pairing_cancels_shared_prompt_difficulty():
    rng = np.random.default_rng(0)
    difficulty = rng.normal(0, 2.0, size=(3, 64))  # large, and shared by both variants
    a = difficulty + 0.2 + rng.normal(0, 0.1, size=(3, 64))
    b = difficulty + rng.normal(0, 0.1, size=(3, 64))
    paired = paired_effect(a, b, name="top - random", n_boot=500)
    # Each prompt of a against another prompt of b: the same scores with the pairing broken.
    unpaired = nested_bootstrap([a - np.roll(b, 1, axis=1)], lambda m: m[0][:, 0], n_boot=500)
    assert paired.verdict == "positive" and paired.n_seeds == 3 and paired.n_items == (64,)
    assert paired.low < 0.2 < paired.high and paired.high - paired.low < 0.1
    assert unpaired[2] - unpaired[1] > 5 * (paired.high - paired.low)  # the same data without pairing


def test_seeds_are_resampled_so_seed_spread_widens_the_interval():
    rng = np.random.default_rng(1)
    items = rng.normal(0, 0.3, size=(4, 50))
    calm = paired_effect(items, np.zeros_like(items), n_boot=400)
    shifted = items + np.array([[-1.0], [1.0], [-1.0], [1.0]])  # seeds disagree; the items within each do not
    spread = paired_effect(shifted, np.zeros_like(items), n_boot=400)
    assert spread.high - spread.low > 3 * (calm.high - calm.low)


def test_bad_shapes_and_values_say_so():
    with pytest.raises(ValueError, match="same shape"):
        paired_effect(np.zeros((2, 5)), np.zeros((2, 6)))
    with pytest.raises(ValueError, match="NaN"):
        paired_effect([1.0, math.nan], [0.0, 0.0])
    with pytest.raises(ValueError, match="seeds"):
        nested_bootstrap([np.zeros((2, 5)), np.zeros((3, 5))], lambda m: m[0][:, 0])
    with pytest.raises(ValueError, match="triple"):
        retention_effect((np.zeros(4), np.ones(4)), (np.zeros(4), np.ones(4), np.ones(4)))


def simulated_runs(rng, n_seeds, n_items, effect):
    """Per-prompt scores of two variants on shared prompts: a seed shift, shared difficulty, item noise."""
    difficulty = rng.normal(0, 1.0, size=n_items)
    seed_shift = rng.normal(0, 0.05, size=(n_seeds, 1))
    a = effect + seed_shift + difficulty + rng.normal(0, 0.5, size=(n_seeds, n_items))
    b = difficulty + rng.normal(0, 0.5, size=(n_seeds, n_items))
    return a, b


def test_paired_effect_covers_the_true_difference():
    rng = np.random.default_rng(2)
    simulations, hits = 500, 0
    for trial in range(simulations):
        a, b = simulated_runs(rng, n_seeds=3, n_items=64, effect=0.3)
        effect = paired_effect(a, b, n_boot=200, seed=trial)
        hits += effect.low <= 0.3 <= effect.high
    assert 0.93 <= hits / simulations <= 0.995  # nominal 0.95; resampling both levels errs wide


def retention_triple(rng, n_seeds, n_items, kept):
    """(start, full, variant) per-prompt values whose true retention is `kept` in every seed."""
    start = np.repeat(rng.normal(2.0, 0.5, size=(1, n_items)), n_seeds, axis=0)  # one start model
    change = 1.0 + rng.normal(0, 0.05, size=(n_seeds, 1))  # each seed's run changes the metric a little differently
    full = start - change + rng.normal(0, 0.3, size=(n_seeds, n_items))
    variant = start - kept * change + rng.normal(0, 0.3, size=(n_seeds, n_items))
    return start, full, variant


def test_retention_effect_covers_the_true_difference():
    rng = np.random.default_rng(3)
    simulations, hits = 500, 0
    for trial in range(simulations):
        harm, utility = retention_triple(rng, 2, 48, kept=0.6), retention_triple(rng, 2, 48, kept=0.4)
        effect = retention_effect(harm, utility, n_boot=200, seed=trial)
        hits += effect.low <= 0.2 <= effect.high
    assert effect.n_seeds == 2 and effect.n_items == (48, 48)
    assert 0.93 <= hits / simulations <= 0.995  # nominal 0.95; resampling both levels errs wide
