"""Δ_S of a hub model: `safety` expands to `safety:<hub name>`, its safety-tuned copy is made by the recipe with
the paper's configs and cached under a content fingerprint, and an unresolvable spec fails in one line."""

import subprocess

import pytest
from safetensors.torch import load_file

from helpers.hub import cache_model, offline_hub_cache
from safeproj.commands.checks import check_subspace_spec
from safeproj.commands.prereq import ensure_safety_tuned, safety_tune_command
from safeproj.model.loading import PrerequisiteMissing, safety_dir, tiny_model
from safeproj.model.subspaces import delta_source, expand_spec

HUB = "Qwen/Qwen2.5-1.5B-Instruct"


@pytest.fixture
def hub(tmp_path):
    with offline_hub_cache(tmp_path / "hub") as cache:
        model, tok = tiny_model(seed=1)
        cache_model(cache, HUB, model, tok)
        yield cache


def test_safety_of_a_hub_run_is_that_models_delta():
    assert expand_spec("safety", HUB) == f"safety:{HUB}"
    assert expand_spec("safety", "tiny-safety") == "safety:tiny"
    with pytest.raises(ValueError, match="preset .* or a hub model"):
        expand_spec("safety", "./some/local/dir")


def test_hub_safety_tuning_layers_the_models_and_the_papers_configs():
    cmd = safety_tune_command(HUB)
    configs = [
        cmd[i + 1].rsplit("/", 2)[-2] + "/" + cmd[i + 1].rsplit("/", 1)[-1]
        for i, a in enumerate(cmd)
        if a == "--config"
    ]
    assert configs == [
        "recipes/safety_tune.yaml",
        "model/qwen2.5-1.5b-instruct.yaml",
        "trainer/paper.yaml",
        "data/paper-safety.yaml",
    ]
    assert cmd[cmd.index("--model.model") + 1] == HUB


def test_a_hub_models_safety_tuned_copy_is_made_once_and_cached(hub, monkeypatch):
    with pytest.raises(PrerequisiteMissing, match=f"safeproj prereq {HUB}"):
        delta_source(f"safety:{HUB}")
    calls = []

    def fake_fit(cmd, env=None):  # stands in for the GPU run: saves a different tiny model where it is asked
        calls.append(cmd)
        model, tok = tiny_model(seed=2)
        target = cmd[cmd.index("--model.checkpoint_dir") + 1]
        model.save_pretrained(target, safe_serialization=True)
        tok.save_pretrained(target)
        return 0

    monkeypatch.setattr(subprocess, "call", fake_fit)
    target = ensure_safety_tuned(HUB)
    assert target == safety_dir(HUB) and target.name.startswith("Qwen--Qwen2.5-1.5B-Instruct-safety-")
    assert ensure_safety_tuned(HUB) == target and len(calls) == 1  # cached
    delta = delta_source(expand_spec("safety", HUB))
    name = "model.layers.0.self_attn.q_proj.weight"
    tuned, base = load_file(target / "model.safetensors"), tiny_model(seed=1)[0].state_dict()
    assert (delta.get(name) - (tuned[name] - base[name])).abs().max() == 0


def test_the_fingerprint_follows_the_hub_snapshot(hub):
    before = safety_dir(HUB)
    model, tok = tiny_model(seed=3)
    cache_model(hub, HUB, model, tok, commit="f" * 40)  # a newer snapshot of main
    assert safety_dir(HUB) != before


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("safety:./local", "no safety tuning for './local'"),
        ("safety:nobody/missing-model", "not in the Hugging Face cache"),
    ],
)
def test_unresolvable_safety_specs_fail_in_one_line(hub, spec, message):
    with pytest.raises(ValueError, match=message) as caught:
        check_subspace_spec("trainer.callbacks[0] PosthocProjection.subspace", spec, HUB)
    assert "\n" not in str(caught.value)
