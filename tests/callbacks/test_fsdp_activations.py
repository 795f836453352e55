"""Two FSDP2 processes (ModelParallelStrategy, gloo) record the activations one process records."""

import json
from pathlib import Path

import pytest
import torch

from helpers.fsdp_activations_worker import LAYERS
from helpers.ranks import rank_results, run_helper
from safeproj.model.recordings import load_activations, recorded_steps

STEPS = [0, 2, 4]  # train start, every 2 steps, train end
SETS = ("harmful", "benign")


def _run(out: Path, devices: int, weights: str) -> list[dict]:
    out.mkdir()
    # A rank left waiting on a forward the others never run fails at the timeout, not forever.
    result = run_helper("fsdp_activations_worker.py", out, devices, weights, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return rank_results(out, devices)


@pytest.fixture(scope="module", params=["full", "lora"])
def runs(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"fsdp_activations_{request.param}")
    single = _run(tmp / "one", 1, request.param)[0]
    sharded = _run(tmp / "two", 2, request.param)
    return tmp, single, sharded


@pytest.mark.slow
def test_sharded_recordings_equal_one_process(runs):
    tmp, single, sharded = runs
    assert not single["sharded"] and all(rank["sharded"] for rank in sharded)
    one, two = tmp / "one" / "acts_rank0", tmp / "two" / "acts_rank0"
    assert recorded_steps(one) == recorded_steps(two) == STEPS
    for step in STEPS:
        manifests = [json.loads((d / f"step_{step}" / "manifest.json").read_text()) for d in (one, two)]
        assert manifests[0] == manifests[1]
        for set_name in SETS:
            for layer in LAYERS:
                want, want_ids = load_activations(one, step, set_name, layer)
                got, got_ids = load_activations(two, step, set_name, layer)
                assert got_ids == want_ids == [0, 1, 2]
                torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    first, last = (load_activations(one, s, "harmful", LAYERS[-1])[0] for s in (STEPS[0], STEPS[-1]))
    assert not torch.allclose(first, last, atol=1e-4)  # training moved the activations: the comparison means something


@pytest.mark.slow
def test_rank_zero_alone_writes_and_every_rank_runs_the_forwards(runs):
    tmp, single, sharded = runs
    assert single["written"] == len(STEPS) and single["followed"] == 0
    assert [(r["written"], r["followed"]) for r in sharded] == [(len(STEPS), 0), (0, len(STEPS))]
    assert all(r["recorded_steps"] == STEPS for r in sharded)
    assert not (tmp / "two" / "acts_rank1").exists()


def _gather_with_rank_one(digest_of_rank_one):
    """all_gather_object of two ranks, rank 1 sending `digest_of_rank_one` (None: the same as rank 0)."""

    def gather(out, digest):
        out[:] = [digest, digest_of_rank_one or digest]

    return gather


def test_ranks_with_other_prompts_are_refused_on_every_rank(monkeypatch):
    from safeproj.callbacks import activation_recorder
    from safeproj.model.activations import EncodedPrompt

    monkeypatch.setattr(activation_recorder.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(activation_recorder.dist, "get_world_size", lambda: 2)
    encoded = {"harmful": [EncodedPrompt((1, 2), (1,))]}
    monkeypatch.setattr(activation_recorder.dist, "all_gather_object", _gather_with_rank_one(None))
    activation_recorder._check_same_on_every_rank(encoded, [0])
    monkeypatch.setattr(activation_recorder.dist, "all_gather_object", _gather_with_rank_one("another plan"))
    with pytest.raises(ValueError, match=r"^ActivationRecorder: ranks \[1\] encoded other prompts"):
        activation_recorder._check_same_on_every_rank(encoded, [0])
