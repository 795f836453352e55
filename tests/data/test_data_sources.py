"""Sources: built-in names, local json/jsonl/csv with field maps, aliases, and one-line errors."""

import csv
import json

import datasets
import huggingface_hub.constants
import pytest

from safeproj.data import sources
from safeproj.data.sources import SourceSpec, load_pairs
from safeproj.data.synthetic import arithmetic, harmful_requests

ROWS = [{"instruction": f"task {i}", "output": f"done {i}", "is_safe": i % 3 != 0, "id": i} for i in range(30)]


def write_json(path, rows):
    path.write_text(json.dumps(rows))
    return str(path)


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def write_csv(path, rows):
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


WRITERS = {"json": write_json, "jsonl": write_jsonl, "csv": write_csv}


# --- built-in ---------------------------------------------------------------------------------


def test_builtin_pairs_follow_the_generator():
    pairs = load_pairs(SourceSpec("builtin:useful"), n=20, seed=4)
    assert pairs == [{"prompt": r["prompt"], "response": r["response"]} for r in arithmetic(20, seed=4)]
    refusals = load_pairs(SourceSpec("builtin:refusal"), n=10, seed=1)
    assert refusals == [{"prompt": r["prompt"], "response": r["response"]} for r in
                        harmful_requests(10, seed=1, split="safety", response="refuse")]  # fmt: skip
    assert len(load_pairs(SourceSpec("builtin:useful"))) == sources.BUILTIN_DEFAULT_SIZE
    assert len(load_pairs(SourceSpec("builtin:useful", limit=7))) == 7


def test_builtin_filter_and_field_map():
    # Filtering keeps the generator's order: the first 25 fraud requests of a long draw.
    want = [r for r in harmful_requests(4000, seed=2) if r["category"] == "fraud"][:25]
    got = load_pairs(SourceSpec("builtin:harmful", filter={"category": "fraud"}), n=25, seed=2)
    assert got == [{"prompt": r["prompt"], "response": r["response"]} for r in want]
    answers = load_pairs(SourceSpec("builtin:useful", response_field="answer"), n=5)
    assert [p["response"] for p in answers] == [r["answer"] for r in arithmetic(5)]


@pytest.mark.parametrize(
    "spec, n, match",
    [
        (SourceSpec("builtin:useful", split="test"), 5, "choose their split by name"),
        (SourceSpec("builtin:useful", filter={"colour": "red"}), 5, "filter column 'colour' not in"),
        (SourceSpec("builtin:harmful", filter={"category": "nope"}), 5, "empty after filter"),
        (SourceSpec("builtin:harmful-test"), 10**6, "usable rows but 1000000 were requested"),
        (SourceSpec("builtin:useful", limit=5), 6, "usable rows but 6 were requested"),
    ],
)
def test_builtin_errors(spec, n, match):
    with pytest.raises(ValueError, match=match):
        load_pairs(spec, n=n)


# --- local files --------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_local_file_default_fields_and_seeded_sample(tmp_path, fmt):
    path = WRITERS[fmt](tmp_path / f"data.{fmt}", ROWS)
    everything = load_pairs(SourceSpec(path))
    assert everything == [{"prompt": r["instruction"], "response": r["output"]} for r in ROWS]
    sample = load_pairs(SourceSpec(path), n=10, seed=3)
    assert sample == load_pairs(SourceSpec(path), n=10, seed=3)
    assert sample != load_pairs(SourceSpec(path), n=10, seed=4)
    assert len({p["prompt"] for p in sample}) == 10 and all(p in everything for p in sample)


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_local_file_filter_limit_and_typed_values(tmp_path, fmt):
    path = WRITERS[fmt](tmp_path / f"data.{fmt}", ROWS)
    unsafe = load_pairs(SourceSpec(path, filter={"is_safe": False}))  # "False" in CSV matches False
    assert [p["prompt"] for p in unsafe] == [r["instruction"] for r in ROWS if not r["is_safe"]]
    picked = load_pairs(SourceSpec(path, filter={"id": [1, 2, 29]}))
    assert [p["response"] for p in picked] == ["done 1", "done 2", "done 29"]
    limited = load_pairs(SourceSpec(path, filter={"is_safe": True}, limit=4))
    assert [p["prompt"] for p in limited] == ["task 1", "task 2", "task 4", "task 5"]


def test_explicit_field_map_and_other_default_names(tmp_path):
    rows = [{"goal": f"g{i}", "target": f"t{i}", "note": f"n{i}"} for i in range(5)]
    path = write_csv(tmp_path / "adv.csv", rows)
    assert load_pairs(SourceSpec(path))[0] == {"prompt": "g0", "response": "t0"}
    assert load_pairs(SourceSpec(path, prompt_field="note", response_field="goal"))[2] == {
        "prompt": "n2", "response": "g2",
    }  # fmt: skip
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"query": "q", "question": "Q", "answer": "A", "response": "R"}])
    assert load_pairs(SourceSpec(qa)) == [{"prompt": "Q", "response": "R"}]  # order of preference


def test_alpaca_input_completes_the_instruction(tmp_path):
    rows = [
        {"instruction": "Add", "input": "2 and 3", "output": "5"},
        {"instruction": "Hi", "input": "", "output": "Hello"},
    ]
    pairs = load_pairs(SourceSpec(write_json(tmp_path / "alpaca.json", rows)))
    assert pairs == [{"prompt": "Add\n\n2 and 3", "response": "5"}, {"prompt": "Hi", "response": "Hello"}]


def test_rows_with_empty_fields_are_skipped(tmp_path):
    rows = [{"prompt": "a", "response": "b"}, {"prompt": "", "response": "x"}, {"prompt": "c", "response": None}]
    assert load_pairs(SourceSpec(write_jsonl(tmp_path / "d.jsonl", rows))) == [{"prompt": "a", "response": "b"}]


def test_json_lines_saved_as_json(tmp_path):
    path = write_jsonl(tmp_path / "lines.json", ROWS[:3])
    assert [p["prompt"] for p in load_pairs(SourceSpec(path))] == ["task 0", "task 1", "task 2"]


def test_local_file_errors_are_one_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    cases = [
        (SourceSpec(str(tmp_path / "missing.jsonl")), None, r"data file not found: '.*missing\.jsonl'"),
        (SourceSpec(path, prompt_field="question"),
         None, "prompt field 'question' not in source .*; available columns: instruction, output, is_safe, id"),
        (SourceSpec(path, response_field="answer"), None, "response field 'answer' not in"),
        (SourceSpec(path, filter={"label": 1}), None, "filter column 'label' not in .* available columns: instruction"),
        (SourceSpec(path, filter={"is_safe": "maybe"}), None, "empty after filter"),
        (SourceSpec(path), 31, "has 30 usable rows but 31 were requested"),
    ]  # fmt: skip
    for spec, n, match in cases:
        with pytest.raises(ValueError, match=match) as err:
            load_pairs(spec, n=n)
        assert "\n" not in str(err.value)
    no_fields = write_jsonl(tmp_path / "x.jsonl", [{"a": 1, "b": 2}])
    no_field = r"no prompt field .*\(looked for prompt\|instruction.*available columns: a, b"
    with pytest.raises(ValueError, match=no_field):
        load_pairs(SourceSpec(no_fields))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{oops\n')
    with pytest.raises(ValueError, match="line 2: invalid JSON"):
        load_pairs(SourceSpec(str(bad)))
    not_list = tmp_path / "obj.json"
    not_list.write_text('{"prompt": "a"}')
    with pytest.raises(ValueError, match="list of objects"):
        load_pairs(SourceSpec(str(not_list)))


# --- hub names and aliases ------------------------------------------------------------------------


def test_unreachable_hub_dataset(monkeypatch):
    # Offline mode makes the real loader fail at once instead of retrying the network.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"^cannot load dataset 'someorg/not-cached-anywhere' \(no network\?\)"):
        load_pairs(SourceSpec("someorg/not-cached-anywhere"), n=3)


def test_aliases_resolve_to_the_paper_datasets(monkeypatch):
    table = datasets.Dataset.from_list(
        [{"prompt": f"p{i}", "response": f"r{i}", "is_safe": i % 2 == 0, "category": "x"} for i in range(40)]
    )
    calls = []

    def fake_load(path, name=None, split=None):  # stands in for the network, nothing else
        calls.append((path, name, split))
        return table

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    unsafe = load_pairs(SourceSpec("beavertails-unsafe"), n=8, seed=1)
    assert calls[-1] == ("PKU-Alignment/BeaverTails", None, "330k_train")
    assert len({p["prompt"] for p in unsafe}) == 8
    assert all(int(p["prompt"][1:]) % 2 == 1 and p["response"] == "r" + p["prompt"][1:] for p in unsafe)
    assert unsafe == load_pairs(SourceSpec("beavertails-unsafe"), n=8, seed=1)
    safe = load_pairs(SourceSpec("beavertails-safe", split="test", limit=5))
    assert calls[-1][2] == "330k_test"
    assert [p["prompt"] for p in safe] == ["p0", "p2", "p4", "p6", "p8"]
    with pytest.raises(ValueError, match="has 20 usable rows but 21"):
        load_pairs(SourceSpec("beavertails-safe"), n=21)
    with pytest.raises(ValueError, match="prompt field 'question' not in source 'gsm8k'"):
        load_pairs(SourceSpec("gsm8k"), n=1)  # gsm8k's own columns are question/answer
    assert calls[-1] == ("openai/gsm8k", "main", "train")
    load_pairs(SourceSpec("metamathqa", prompt_field="prompt"), n=1)
    assert calls[-1] == ("meta-math/MetaMathQA", None, "train")
    load_pairs(SourceSpec("org/other", config_name="cfg", split="validation"), n=1)
    assert calls[-1] == ("org/other", "cfg", "validation")


# --- the spec itself --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"path": ""}, "path must be a non-empty string"),
        ({"path": "x.jsonl", "weight": 0}, "weight must be finite and > 0"),
        ({"path": "x.jsonl", "weight": float("nan")}, "weight must be finite"),
        ({"path": "x.jsonl", "limit": 0}, "limit must be a positive integer"),
        ({"path": "x.jsonl", "filter": {}}, "filter must be a non-empty mapping"),
        ({"path": "x.jsonl", "prompt_field": ""}, "prompt_field must be a non-empty string"),
        ({"path": "builtin:nothing"}, "unknown built-in source 'builtin:nothing'; known: .*builtin:harmful"),
    ],
)
def test_source_spec_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SourceSpec(**kwargs)
