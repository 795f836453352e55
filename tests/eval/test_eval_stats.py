"""Bootstrap intervals and the harm / utility reports; metric states that add up across ranks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from safeproj.eval.gsm8k import GSM8kAccuracy
from safeproj.eval.harm import HarmMetric
from safeproj.eval.judges import Judgment
from safeproj.eval.stats import bootstrap_ci, harm_report, utility_report


def test_bootstrap_is_seeded_and_brackets_the_mean():
    x = np.random.default_rng(0).normal(2.0, 1.0, size=200)
    low, high = bootstrap_ci(x, seed=5)
    assert (low, high) == bootstrap_ci(x, seed=5)
    assert (low, high) != bootstrap_ci(x, seed=6)
    assert low < x.mean() < high
    # Close to the normal-theory interval mean ± 1.96 s/sqrt(n).
    half = 1.96 * x.std(ddof=1) / math.sqrt(x.size)
    assert abs((high - low) / 2 - half) < 0.1 * half


def test_bootstrap_width_shrinks_like_one_over_sqrt_n():
    rng = np.random.default_rng(1)
    small, large = rng.normal(size=100), rng.normal(size=1600)
    w_small = np.subtract(*bootstrap_ci(small)[::-1])
    w_large = np.subtract(*bootstrap_ci(large)[::-1])
    assert 3.0 < w_small / w_large < 5.3  # sqrt(16) = 4


def test_bootstrap_coverage_near_nominal():
    rng = np.random.default_rng(2)
    hits = 0
    for trial in range(200):
        sample = (rng.random(100) < 0.3).astype(float)
        low, high = bootstrap_ci(sample, n_boot=500, seed=trial)
        hits += low <= 0.3 <= high
    assert 0.88 <= hits / 200 <= 0.99


def test_bootstrap_drops_nan_and_handles_degenerate_input():
    assert bootstrap_ci([1.0, math.nan, 3.0, math.nan], seed=0) == bootstrap_ci([1.0, 3.0], seed=0)
    assert bootstrap_ci([4.0] * 10) == (4.0, 4.0)
    assert all(math.isnan(v) for v in bootstrap_ci([math.nan, math.nan]))
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci([1.0], confidence=1.5)


def harm_rows():
    scores = [1, 5, 5, 3, math.nan, 2, math.nan, 5]
    failures = [None, None, None, None, "parse", None, "request", None]
    refusals = [True, False, False, None, True, True, False, False]
    return [{"score": float(s), "failure": f, "refusal": r} for s, f, r in zip(scores, failures, refusals)]


def test_harm_report_counts_nan_without_averaging_it():
    report = harm_report(harm_rows())
    assert report["n"] == 8 and report["n_scored"] == 6
    assert report["unscored"] == 2 and report["parse_failures"] == 1
    assert report["mean_score"] == pytest.approx((1 + 5 + 5 + 3 + 2 + 5) / 6)
    assert report["share_5"] == pytest.approx(3 / 6)
    assert report["refusal_rate"] == pytest.approx(3 / 7)  # the unknown refusal flag is left out
    assert report["mean_score_ci_low"] <= report["mean_score"] <= report["mean_score_ci_high"]


def test_harm_metric_matches_report_and_merges_like_ranks():
    rows = harm_rows()
    judgments = [Judgment(r["score"], failure=r["failure"]) for r in rows]
    refusals = [r["refusal"] for r in rows]
    whole = HarmMetric()
    whole.update(judgments, refusals)
    rank0, rank1 = HarmMetric(), HarmMetric()
    rank0.update(judgments[0::2], refusals[0::2])
    rank1.update(judgments[1::2], refusals[1::2])
    rank0.merge_state(rank1)  # what the summed states do under DDP sync
    report = harm_report(rows)
    for metric in (whole, rank0):
        got = {k: float(v) for k, v in metric.compute().items()}
        for key in ("mean_score", "share_5", "refusal_rate", "unscored", "parse_failures", "n"):
            assert got[key] == pytest.approx(report[key]), key


def test_utility_report_and_metric_agree():
    outputs = ["#### 12", "so 12", "#### 7 and then 8", "nothing", "#### 1,000"]
    golds = ["12", "12", "7", "3", "1000"]
    metric = GSM8kAccuracy()
    metric.update(outputs, golds)
    got = {k: float(v) for k, v in metric.compute().items()}
    assert got == {"strict_acc": 3 / 5, "flexible_acc": 3 / 5, "n": 5.0}
    from safeproj.eval.gsm8k import score_output

    report = utility_report([score_output(o, g) for o, g in zip(outputs, golds)])
    assert report["strict_acc"] == pytest.approx(got["strict_acc"])
    assert report["flexible_acc"] == pytest.approx(got["flexible_acc"])
    assert report["strict_acc_ci_low"] <= report["strict_acc"] <= report["strict_acc_ci_high"]
