"""load_records: one reader for built-in sets, local files and hub names; errors name the file and line."""

import json

import datasets
import pytest

from safeproj.data.records import HUB_CONFIGS, complete_rows, load_records, source_kind


def test_kinds_of_source(tmp_path):
    existing = tmp_path / "rows.jsonl"
    existing.write_text('{"prompt": "a"}\n')
    assert source_kind("builtin:useful-test") == "builtin"
    assert source_kind("builtin:useful-train") == "builtin"  # evaluation's name for the train split
    assert source_kind(str(existing)) == source_kind("missing.csv") == "local"
    assert source_kind("org/name") == "hub"
    with pytest.raises(ValueError, match="unknown data source 'nonsense': not a built-in set"):
        source_kind("nonsense")
    with pytest.raises(ValueError, match="unknown built-in source 'builtin:nope'"):
        source_kind("builtin:nope")


def test_builtin_sets_are_generated_and_capped_at_their_size():
    records = load_records("builtin:useful-train", n=4, seed=2)
    assert records.rows() == load_records("builtin:useful", n=4, seed=2).rows()
    assert {"prompt", "response", "answer"} <= set(records.columns)
    with pytest.raises(ValueError, match="is generated: give a number of rows"):
        load_records("builtin:useful")
    with pytest.warns(UserWarning, match="builtin:harmful-test has .* distinct rows; using all of them"):
        capped = load_records("builtin:harmful-test", n=10**6)
    assert 0 < len(capped) < 10**6


def test_local_rows_know_their_lines(tmp_path):
    lines = tmp_path / "rows.jsonl"
    lines.write_text('{"prompt": "a"}\n\n{"prompt": "b", "extra": 1}\n')
    records = load_records(str(lines))
    assert records.rows() == [{"prompt": "a"}, {"prompt": "b", "extra": 1}]
    assert records.columns == ["prompt", "extra"]
    assert [records.where(i) for i in range(2)] == [f"{lines} line 1", f"{lines} line 3"]
    table = tmp_path / "rows.csv"
    table.write_text('prompt,answer\n"multi\nline",1\nb,2\n')
    records = load_records(str(table))
    assert records.rows() == [{"prompt": "multi\nline", "answer": "1"}, {"prompt": "b", "answer": "2"}]
    assert records.where(1) == f"{table} line 4"
    items = tmp_path / "rows.json"
    items.write_text(json.dumps([{"prompt": "a"}, {"prompt": "b"}]))
    assert load_records(str(items)).where(1) == f"{items} item 2"


def test_data_errors_name_the_file_and_line(tmp_path):
    wide = tmp_path / "wide.csv"
    wide.write_text("prompt,answer\na,1\nb,2,surplus\n")
    with pytest.raises(ValueError, match=r"wide\.csv line 3: 3 cells but the header has 2"):
        load_records(str(wide))
    items = tmp_path / "items.json"
    items.write_text('[{"prompt": "a"}, "b"]')
    with pytest.raises(ValueError, match=r"items\.json item 2: expected a JSON object, got str"):
        load_records(str(items))
    not_object = tmp_path / "lines.jsonl"
    not_object.write_text('{"prompt": "a"}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"lines\.jsonl line 2: expected a JSON object, got list"):
        load_records(str(not_object))
    with pytest.raises(ValueError, match="is a directory"):
        load_records(str(tmp_path))


def test_dropped_rows_are_counted_and_located(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"q": "a", "a": "1"}, {"q": " ", "a": "2"}, {"q": "c"}, {"q": "d", "a": "4"}, {"q": None, "a": "5"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = load_records(str(path))
    with pytest.warns(
        UserWarning, match=r"d\.jsonl: dropped 3 of 5 rows with an empty q or a \(line 2, line 3, line 5\)"
    ):
        kept = complete_rows(records, ["q", "a"])
    assert [r["q"] for r in kept.rows()] == ["a", "d"]
    assert kept.where(1) == f"{path} line 4"
    with pytest.warns(UserWarning, match="dropped 2 of 4 rows"):  # stops reading once `limit` rows are kept
        assert [r["q"] for r in complete_rows(records, ["q", "a"], limit=2).rows()] == ["a", "d"]


def test_hub_sets_stay_arrow_tables_and_get_known_configurations(monkeypatch):
    table = datasets.Dataset.from_list([{"question": f"q{i}", "answer": "" if i % 2 else f"a{i}"} for i in range(6)])
    calls = []

    def fake_load(path, name=None, split=None):  # stands in for the network, nothing else
        calls.append((path, name, split))
        return table

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    records = load_records("openai/gsm8k", split="test")
    assert calls == [("openai/gsm8k", HUB_CONFIGS["openai/gsm8k"], "test")]
    assert isinstance(records.table, datasets.Dataset) and records.columns == ["question", "answer"]
    with pytest.warns(UserWarning, match=r"openai/gsm8k: dropped 3 of 6 rows .* \(row 2, row 4, row 6\)"):
        kept = complete_rows(records, ["question", "answer"])
    assert isinstance(kept.table, datasets.Dataset)
    assert [r["question"] for r in kept.rows()] == ["q0", "q2", "q4"]
