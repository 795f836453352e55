"""Two FSDP2 processes (ModelParallelStrategy, gloo) measure overlaps and apply SafeLoRA as one process does."""

import math
from pathlib import Path

import pytest
import torch

from helpers.fsdp_posthoc_worker import reference
from helpers.ranks import rank_results, run_helper


def _run(out: Path, devices: int, spec: str, weights: str) -> list[dict]:
    out.mkdir()
    result = run_helper("fsdp_overlap_worker.py", str(out), str(devices), spec, weights, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    return rank_results(out, devices)


@pytest.fixture(scope="module", params=["full", "lora"])
def runs(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"fsdp_overlap_{request.param}")
    spec = reference(tmp / "reference")
    return _run(tmp / "one", 1, spec, request.param)[0], _run(tmp / "two", 2, spec, request.param)


@pytest.mark.slow
def test_sharded_overlap_tables_equal_one_process(runs):
    single, sharded = runs
    assert not single["sharded"] and all(r["sharded"] for r in sharded)
    for rank in sharded:  # every rank computes the whole tables
        for got, want in zip(rank["overlap"], single["overlap"]):  # left side, then right side
            rows_got, rows_want = got["ref"], want["ref"]
            assert len(rows_got) == len(rows_want) > 0
            for g, w in zip(rows_got, rows_want):
                assert {k: v for k, v in g.items() if not isinstance(v, float)} == {
                    k: v for k, v in w.items() if not isinstance(v, float)
                }
                assert g["baseline"] == w["baseline"]
                assert g["mso"] == pytest.approx(w["mso"], abs=1e-5), (w["name"], w["eta"])
                # ratio = mso / baseline: the same difference, scaled
                assert g["ratio"] == pytest.approx(w["ratio"], abs=1e-5 / w["baseline"]), (w["name"], w["eta"])
                assert g["angle_deg"] == pytest.approx(w["angle_deg"], abs=1e-3), (w["name"], w["eta"])


@pytest.mark.slow
def test_sharded_safelora_selects_and_rewrites_as_one_process(runs):
    single, sharded = runs
    assert all(single["selected"]), "each SafeLoRA callback rewrites some layer"
    for rank in sharded:
        assert rank["selected"] == single["selected"]
        for got, want in zip(rank["similarities"], single["similarities"]):
            assert got.keys() == want.keys()
            for name, value in want.items():
                assert math.isnan(value) == math.isnan(got[name])
                if not math.isnan(value):
                    assert got[name] == pytest.approx(value, abs=1e-5), name
        for name, want in single["weights"].items():
            torch.testing.assert_close(rank["weights"][name], want, rtol=0, atol=2e-5)


@pytest.mark.slow
def test_sharded_callbacks_gather_no_weight(runs):
    single, sharded = runs
    # The worker refuses every gather (but LoRA's A) while overlaps are measured and SafeLoRA applied; these ran.
    for rank in sharded:
        assert rank["measured"] == single["measured"] == 2 and rank["rewritten"] == single["rewritten"] == 2
