"""Two FSDP2 processes (ModelParallelStrategy, gloo) score post hoc variants and measure drift as one process does."""

import math
from pathlib import Path

import pytest
import torch

from helpers.fsdp_posthoc_worker import reference
from helpers.projection import TinyLM, random_basis
from helpers.ranks import rank_results, run_helper


def _run(out: Path, devices: int, spec: str, basis: Path, weights: str) -> list[dict]:
    out.mkdir()
    result = run_helper("fsdp_posthoc_worker.py", str(out), str(devices), spec, str(basis), weights, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    return rank_results(out, devices)


def _assert_rows_close(got: list[dict], want: list[dict], atol: float) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for key, value in w.items():
            if isinstance(value, float) and not (math.isnan(value) and math.isnan(g[key])):
                assert g[key] == pytest.approx(value, abs=atol), key
            elif not isinstance(value, float):
                assert g[key] == value, key


@pytest.fixture(scope="module", params=["full", "lora"])
def runs(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"fsdp_posthoc_{request.param}")
    spec = reference(tmp / "reference")
    basis = tmp / "b.safetensors"
    random_basis(TinyLM().model, basis, frac=0.5)
    return _run(tmp / "one", 1, spec, basis, request.param)[0], _run(tmp / "two", 2, spec, basis, request.param)


@pytest.mark.slow
def test_sharded_posthoc_rows_equal_one_process(runs):
    single, sharded = runs
    assert not single["sharded"] and all(r["sharded"] for r in sharded)
    # parallel: full and top@0.5; orthogonal: full and top@0.5, with every evaluator's numbers
    assert [len(rows) for rows in single["posthoc"]] == [2, 2]
    assert any(k.startswith("harm/") for k in single["posthoc"][0][0])
    for rank in sharded:
        for got, want in zip(rank["posthoc"], single["posthoc"]):
            _assert_rows_close(got, want, atol=1e-4)
    kept = [rows[1]["energy_kept"] for rows in single["posthoc"]]
    assert 0 < kept[0] < 1 and kept[0] + kept[1] == pytest.approx(1, abs=1e-5)  # P and P⊥ split the energy


@pytest.mark.slow
def test_sharded_generations_and_likelihoods_equal_one_process(runs):
    single, sharded = runs
    for rank in sharded:  # every rank gathers all rows; greedy text is identical, log-likelihoods close
        assert [r["response"] for r in rank["harm_rows"]] == [r["response"] for r in single["harm_rows"]]
        assert [r["output"] for r in rank["utility_rows"]] == [r["output"] for r in single["utility_rows"]]
        _assert_rows_close(rank["likelihood_rows"], single["likelihood_rows"], atol=1e-4)


@pytest.mark.slow
def test_sharded_drift_equals_one_process(runs):
    single, sharded = runs
    assert {r["step"] for r in single["drift"]} == {1, 2, 3, 4}
    for rank in sharded:
        _assert_rows_close(rank["drift"], single["drift"], atol=1e-5)


@pytest.mark.slow
def test_sharded_projection_gathers_no_weight_and_restores_training(runs):
    single, sharded = runs
    # The worker refuses every gather while variants are written and drift measured; these ran.
    for rank in sharded:
        assert rank["projected"] == single["projected"] == 4 and rank["measured"] == single["measured"] == 4
        for name, want in single["weights"].items():  # the trained weights are back after the variants
            torch.testing.assert_close(rank["weights"][name], want, rtol=0, atol=2e-5)
