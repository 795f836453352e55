"""The benchmark scripts run against the current API (on the tiny model, at sizes too small to measure)."""

import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    """benchmarks/<name>.py imported by its own name, as when run as a script (its processes import it too)."""
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.append(str(ROOT / "benchmarks"))  # last: it shadows no installed module
    module = importlib.import_module(name)
    assert Path(module.__file__).parent == ROOT / "benchmarks", module.__file__
    return module


def test_projection_overhead_and_sharded_traffic_rows(tmp_path):
    bench = _script("projection")
    row = bench.step_overhead("tiny", 0.25, batch=1, length=16, pairs=1, tmp=tmp_path)
    assert row["step_s_with"] > 0 and row["projection_s"] > 0 and 0 < row["flop_floor"] < 1
    [left, right] = bench.sharded_traffic("tiny", [0.25], tmp_path)
    assert (left["side"], right["side"]) == ("left", "right")
    assert left["projection_allreduce_payload_bytes"] > 0 == right["projection_allreduce_payload_bytes"]


@pytest.mark.parametrize(
    "name", ["activations", "basis_threads", "judge", "metrics", "overlap", "projection", "sharded_step"]
)
def test_every_benchmark_imports(name):
    assert callable(_script(name).main)


def test_sharded_step_time_on_two_processes(tmp_path):
    row = _script("sharded_step").measure("tiny", 0.25, batch=1, length=16, pairs=1, tmp=tmp_path, port=29581)
    assert row["processes"] == 2 and row["step_s_with"] > 0 and row["projection_s"] > 0
