import math

import pytest

from safeproj.io import atomic_dir, atomic_file, write_csv, write_json


def test_atomic_file_leaves_nothing_when_the_block_fails(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_write_json_refuses_nan_only_when_asked(tmp_path):
    write_json(tmp_path / "a.json", {"x": math.nan})
    with pytest.raises(ValueError):
        write_json(tmp_path / "b.json", {"x": math.nan}, allow_nan=False)
    assert not (tmp_path / "b.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_write_csv_columns_in_order_of_first_appearance(tmp_path):
    path = write_csv(tmp_path / "rows.csv", [{"b": 1, "a": 2}, {"a": 3, "c": 4}])
    assert path.read_text().splitlines() == ["b,a,c", "1,2,", ",3,4"]


def test_atomic_dir_swaps_whole_and_keeps_existing_on_request(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "stale.bin").write_text("stale")
    with atomic_dir(target) as tmp:
        (tmp / "model.safetensors").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["model.safetensors"]

    with atomic_dir(target, keep_existing=True) as tmp:
        (tmp / "other.bin").write_text("race loser")
    assert sorted(p.name for p in target.iterdir()) == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_atomic_dir_keeping_an_existing_folder_still_reports_a_failing_block(tmp_path):
    (tmp_path / "cache").mkdir()
    with pytest.raises(RuntimeError, match="conversion failed"), atomic_dir(tmp_path / "cache", keep_existing=True):
        raise RuntimeError("conversion failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_atomic_dir_removes_the_partial_folder_on_failure(tmp_path):
    with pytest.raises(KeyboardInterrupt), atomic_dir(tmp_path / "run") as tmp:
        (tmp / "shard0").write_text("x")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
