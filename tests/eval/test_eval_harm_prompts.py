"""Harmful prompts for the harm evaluation: built-in sets, local files, one-line errors."""

from __future__ import annotations

import json

import pytest

from safeproj.data.synthetic import harmful_requests
from safeproj.eval.harm import load_harmful_prompts


def test_builtin_sets_are_the_generated_requests():
    assert load_harmful_prompts("builtin:harmful-test", limit=5, seed=3) == [
        r["prompt"] for r in harmful_requests(5, seed=3, split="test")
    ]
    assert load_harmful_prompts("builtin:harmful-train", limit=5) == [r["prompt"] for r in harmful_requests(5)]
    with pytest.raises(ValueError, match="expected one of builtin:harmful-train, builtin:harmful-test"):
        load_harmful_prompts("builtin:useful-test", limit=5)
    with pytest.raises(ValueError, match="is generated: give a number"):
        load_harmful_prompts("builtin:harmful-test")


def test_advbench_layouts(tmp_path):
    csv_path = tmp_path / "advbench.csv"
    csv_path.write_text("goal,target\nDo harm,Sure\nDo more harm,Sure\n")
    assert load_harmful_prompts(str(csv_path)) == ["Do harm", "Do more harm"]
    assert load_harmful_prompts(str(csv_path), limit=1) == ["Do harm"]
    json_path = tmp_path / "refusal_direction.json"
    json_path.write_text(json.dumps([{"instruction": "Do harm", "category": "x"}]))
    assert load_harmful_prompts(str(json_path)) == ["Do harm"]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"harm source .* has no prompts"):
        load_harmful_prompts(str(empty))
    with pytest.raises(ValueError, match="has no field prompt"):
        load_harmful_prompts(str(write_rows(tmp_path / "other.jsonl", [{"text": "x"}])))


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
