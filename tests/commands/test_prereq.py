"""Which safety-tuned presets a config needs, found before anything is built."""

from safeproj.commands.prereq import presets_needed


def test_presets_named_by_specs_and_models_are_found():
    config = {"model": {"model": "smollm2-135m-safety"}, "callbacks": [{"subspace": "safety:tiny"}]}
    assert presets_needed(config) == ["smollm2-135m", "tiny"]


def test_a_bare_safety_subspace_needs_the_preset_the_run_starts_from():
    config = {"model": {"model": "tiny"}, "trainer": {"callbacks": [{"init_args": {"subspace": "safety"}}]}}
    assert presets_needed(config) == ["tiny"]


def test_hub_models_and_other_specs_need_no_preset():
    config = {"model": {"model": "Qwen/Qwen2.5-1.5B-Instruct"}, "trainer": {"callbacks": [{"subspace": "a,b"}]}}
    assert presets_needed(config) == []
