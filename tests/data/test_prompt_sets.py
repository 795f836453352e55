"""Prompt sets: built-in sets, local files with a field, one-line errors for unknown specs."""

from __future__ import annotations

import json

import pytest

from safeproj.data.prompts import check_prompt_sets, load_prompts, parse_prompt_spec


def test_load_prompt_set_files(prompt_files, tmp_path):
    sets, harmful, benign = prompt_files
    assert load_prompts(sets["harmful"], 3) == harmful[:3]  # jsonl, field "goal"
    assert load_prompts(sets["benign"], 100) == benign  # csv, field "instruction"
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"prompt": "a", "text": "x"}, {"prompt": "b", "text": "y"}]))
    assert load_prompts(str(path), 5) == ["a", "b"]
    assert load_prompts(f"{path}#text", 5) == ["x", "y"]
    with pytest.raises(ValueError, match="no field missing"):
        load_prompts(f"{path}#missing", 5)
    with pytest.raises(ValueError, match="not found"):
        load_prompts(str(tmp_path / "nope.jsonl"), 5)
    with pytest.raises(ValueError, match="unknown prompt set"):
        load_prompts("nonsense", 5)
    with pytest.raises(ValueError, match="unknown built-in prompt set 'builtin:funny-test'"):
        load_prompts("builtin:funny-test", 5)


def test_builtin_prompt_sets():
    from safeproj.data import synthetic
    from safeproj.data.synthetic_requests import benign_requests, harmful_requests

    harmful = load_prompts("builtin:harmful-test", 6, seed=0)
    benign = load_prompts("builtin:benign-test", 6, seed=0)
    useful = load_prompts("builtin:useful-test", 6, seed=0)
    assert harmful == [r["prompt"] for r in harmful_requests(6, 0, split="test")]
    assert benign == [r["prompt"] for r in benign_requests(6, 0, split="test")]
    assert useful == [r["prompt"] for r in synthetic.arithmetic(6, 0, split="test")]
    assert load_prompts("builtin:harmful-test", 6, seed=1) != harmful
    # a request beyond a finite generator's size gives all it has rather than failing
    capacity = synthetic.builtin_capacity("builtin:harmful-test")
    assert len(load_prompts("builtin:harmful-test", capacity + 5)) == capacity


def test_one_field_list_for_every_prompt_reader(tmp_path):
    # `instruction` comes before `goal` for training sources, prompt sets and harmful prompts alike.
    from safeproj.data.records import PROMPT_FIELDS
    from safeproj.data.sources import SourceSpec, load_pairs
    from safeproj.eval.harm import load_harmful_prompts

    path = tmp_path / "both.jsonl"
    path.write_text(json.dumps({"goal": "g", "instruction": "i", "target": "t"}) + "\n")
    assert PROMPT_FIELDS.index("instruction") < PROMPT_FIELDS.index("goal")
    assert load_prompts(str(path)) == load_harmful_prompts(str(path)) == ["i"]
    assert load_pairs(SourceSpec(str(path)))[0]["prompt"] == "i"
    assert load_prompts(f"{path}#goal") == load_harmful_prompts(f"{path}#goal") == ["g"]


def test_empty_prompts_are_dropped_and_reported(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt\na\n\n \nb\nc\n")
    with pytest.warns(UserWarning, match=r"p\.csv: dropped 1 of 3 rows with an empty prompt \(line 4\)"):
        assert load_prompts(str(path), 2) == ["a", "b"]


def test_prompt_set_specs_are_checked_before_loading(tmp_path):
    check_prompt_sets(
        {"harmful": "builtin:harmful-test", "useful": str(tmp_path / "later.jsonl"), "hub": "org/x@test#q"}
    )
    assert parse_prompt_spec("org/x@test#q") == ("org/x", "test", "q")
    assert parse_prompt_spec("org/x") == ("org/x", "train", None)
    for bad, match in [("nonsense", "unknown prompt set 'nonsense'"), ("builtin:x", "unknown built-in prompt set")]:
        with pytest.raises(ValueError, match=match):
            check_prompt_sets({"s": bad})
    with pytest.raises(ValueError, match="prompt set name 'a b'"):
        check_prompt_sets({"a b": "builtin:harmful-test"})


def test_default_prompt_sets_contrast_harmful_and_benign_requests_of_one_form():
    from safeproj.data.prompts import DEFAULT_PROMPT_SETS
    from safeproj.data.synthetic_requests import BENIGN_CATEGORIES, HARM_CATEGORIES

    assert set(DEFAULT_PROMPT_SETS) == {"harmful", "benign"}
    harmful = load_prompts(DEFAULT_PROMPT_SETS["harmful"], 64)
    benign = load_prompts(DEFAULT_PROMPT_SETS["benign"], 64)
    benign_acts = [a for acts in BENIGN_CATEGORIES.values() for a in acts]
    harmful_acts = [a for acts in HARM_CATEGORIES.values() for a in acts]
    assert all(any(a in p for a in benign_acts) and not any(a in p for a in harmful_acts) for p in benign)
    assert all(any(a in p for a in harmful_acts) for p in harmful)
    # requests, not the arithmetic word problems the contrast used before
    assert not any("#### " in p or "$" in p for p in benign)
