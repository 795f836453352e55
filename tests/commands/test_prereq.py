"""Which safety-tuned models a config needs, found before anything is built."""

from safeproj.commands.prereq import safety_models_needed


def test_presets_named_by_specs_and_models_are_found():
    config = {"model": {"model": "smollm2-135m-safety"}, "callbacks": [{"subspace": "safety:tiny"}]}
    assert safety_models_needed(config) == ["smollm2-135m", "tiny"]


def test_a_bare_safety_subspace_needs_the_preset_the_run_starts_from():
    config = {"model": {"model": "tiny"}, "trainer": {"callbacks": [{"init_args": {"subspace": "safety"}}]}}
    assert safety_models_needed(config) == ["tiny"]


def test_other_specs_need_no_safety_tuning():
    config = {"model": {"model": "Qwen/Qwen2.5-1.5B-Instruct"}, "trainer": {"callbacks": [{"subspace": "a,b"}]}}
    assert safety_models_needed(config) == []


def test_a_bare_safety_subspace_of_a_hub_run_needs_that_hub_model_tuned():
    config = {"model": {"model": "Qwen/Qwen2.5-1.5B-Instruct"}, "trainer": {"callbacks": [{"subspace": "safety"}]}}
    assert safety_models_needed(config) == ["Qwen/Qwen2.5-1.5B-Instruct"]
    assert safety_models_needed({"x": "safety:org/model@v1"}) == ["org/model@v1"]


def test_delta_pairs_and_stand_in_alignments_that_name_a_safety_preset_are_found():
    assert safety_models_needed({"s": "tiny-safety,tiny"}) == ["tiny"]
    assert safety_models_needed({"s": "alignment:tiny"}) == ["tiny"]  # the tiny stand-in's Δ_A
    assert safety_models_needed({"s": "alignment:qwen2.5-1.5b", "t": "alignment:nope"}) == []
