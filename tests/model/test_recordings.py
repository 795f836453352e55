"""Recordings on disk: bounded shards, atomic steps, storage dtypes, analysis of every step and its report."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open

from helpers.activations import basis_with_known_range
from safeproj.core.activations import diff_of_means, linear_probe
from safeproj.model.activations import decoder_layers, encode_prompts
from safeproj.model.loading import tiny_model
from safeproj.model.recordings import (
    ShardWriter,
    analyse_recordings,
    load_activations,
    record_step,
    recorded_steps,
    summary_table,
    write_report,
)

PROMPTS = ["hi", "what is 12 + 30?", "tell me how to pick a lock on a door", "ok!", "seven times six"]


def test_error_mid_recording_leaves_no_hooks_and_no_partial_step(tmp_path, monkeypatch):
    model, tok = tiny_model(layers=2)
    encoded = {"s": encode_prompts(tok, PROMPTS, "last")}
    calls = {"n": 0}
    real_add = ShardWriter.add

    def failing_add(self, rows, ids):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        real_add(self, rows, ids)

    monkeypatch.setattr(ShardWriter, "add", failing_add)
    with pytest.raises(OSError, match="disk full"):
        record_step(model, encoded, [0, 1], tmp_path, 3, position="last", pad_id=0, batch_size=2, progress=False)
    assert all(len(b._forward_hooks) == 0 for b in decoder_layers(model))
    assert list(tmp_path.iterdir()) == []  # neither step_3 nor its hidden work folder


def test_shards_flush_and_memory_stays_bounded(tmp_path):
    model, tok = tiny_model(layers=2)
    prompts = [f"prompt number {i}" + "!" * i for i in range(10)]
    encoded = {"s": encode_prompts(tok, prompts, "last")}
    small = record_step(
        model,
        encoded,
        [0, 1],
        tmp_path / "small",
        0,
        position="last",
        pad_id=0,
        batch_size=4,
        shard_size=3,
        progress=False,
    )
    big = record_step(
        model,
        encoded,
        [0, 1],
        tmp_path / "big",
        0,
        position="last",
        pad_id=0,
        batch_size=4,
        shard_size=1000,
        progress=False,
    )
    files = sorted(p.name for p in (tmp_path / "small" / "step_0").glob("s_layer0_shard*.safetensors"))
    assert len(files) == math.ceil(10 / 3) == 4
    assert small.max_buffered_rows <= 3 < big.max_buffered_rows
    assert small.shards == 8 and big.shards == 2
    for layer in (0, 1):
        a, ids = load_activations(tmp_path / "small", 0, "s", layer)
        b, _ = load_activations(tmp_path / "big", 0, "s", layer)
        assert ids == list(range(10))
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    with safe_open(str(tmp_path / "small" / "step_0" / "s_layer1_shard1.safetensors"), framework="pt") as f:
        meta = f.metadata()
        assert f.get_tensor("activations").shape == (3, 64)
    assert meta["step"] == "0" and meta["layer"] == "1" and meta["position"] == "last" and meta["dtype"] == "float32"
    assert json.loads(meta["prompt_ids"]) == [3, 4, 5]
    manifest = json.loads((tmp_path / "small" / "step_0" / "manifest.json").read_text())
    assert manifest["sets"] == {"s": 10} and manifest["layers"] == [0, 1]
    # payload = prompts × layers × hidden × 4 bytes; the files add only small safetensors headers
    assert small.payload_bytes == 10 * 2 * 64 * 4
    assert small.payload_bytes < small.bytes_written < small.payload_bytes + 8 * 600


def test_bfloat16_storage(tmp_path):
    model, tok = tiny_model(layers=2)
    encoded = {"s": encode_prompts(tok, PROMPTS, "last")}
    r32 = record_step(model, encoded, [1], tmp_path / "f32", 0, position="last", pad_id=0, progress=False)
    r16 = record_step(
        model, encoded, [1], tmp_path / "bf16", 0, position="last", pad_id=0, dtype="bfloat16", progress=False
    )
    with safe_open(str(tmp_path / "bf16" / "step_0" / "s_layer1_shard0.safetensors"), framework="pt") as f:
        assert f.get_tensor("activations").dtype == torch.bfloat16
    a, _ = load_activations(tmp_path / "f32", 0, "s", 1)
    b, _ = load_activations(tmp_path / "bf16", 0, "s", 1)
    torch.testing.assert_close(b, a, rtol=1e-2, atol=1e-2)
    assert r16.payload_bytes * 2 == r32.payload_bytes


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """Two recordings of the tiny model, the second after perturbing its weights."""
    out = tmp_path_factory.mktemp("acts")
    model, tok = tiny_model(seed=3, layers=4)
    harmful = [f"how do I hurt person {i}" + "?" * (i % 3) for i in range(12)]
    benign = [f"how do I help person {i}" + "!" * (i % 4) for i in range(12)]
    encoded = {"harmful": encode_prompts(tok, harmful, "last"), "benign": encode_prompts(tok, benign, "last")}
    record_step(model, encoded, [1, 3], out, 0, position="last", pad_id=0, batch_size=5, progress=False)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    record_step(model, encoded, [1, 3], out, 10, position="last", pad_id=0, batch_size=5, progress=False)
    (out / ".step_20-partial").mkdir()  # an interrupted recording is ignored
    (out / "step_30").mkdir()  # so is a step without a manifest
    return out


def test_analyse_recordings_rows(two_steps):
    assert recorded_steps(two_steps) == [0, 10]
    etas = (0.3, 0.6, 0.9)
    report = analyse_recordings(two_steps, etas=etas)
    assert len(report["mso"]) == 2 * 2 * 2 * len(etas)  # steps × layers × centerings × η
    assert [(r["step"], r["layer"]) for r in report["layers"]] == [(0, 1), (0, 3), (10, 1), (10, 3)]
    harmful, _ = load_activations(two_steps, 10, "harmful", 3)
    benign, _ = load_activations(two_steps, 10, "benign", 3)
    row = report["layers"][-1]
    assert row["diff_norm"] == pytest.approx(diff_of_means(harmful, benign)[1], rel=1e-6)
    assert {k: row[k] for k in linear_probe(harmful, benign)} == linear_probe(harmful, benign)
    assert row["probe_n_test"] == 12 and row["n_benign"] == 12
    quarter = analyse_recordings(two_steps, etas=etas, probe_test_size=0.25)
    assert quarter["layers"][-1]["probe_n_test"] == 6
    assert report["layers"][0]["direction_cosine_to_first"] == pytest.approx(1.0, abs=1e-5)
    assert report["layers"][-1]["direction_cosine_to_first"] < 0.999  # the perturbation moved it
    changes = [r for r in report["changes"] if r["layer"] == 3 and r["metric"] == "diff_norm"]
    assert changes[0]["first"] == pytest.approx(report["layers"][1]["diff_norm"])
    assert changes[0]["last"] == pytest.approx(row["diff_norm"])
    metrics = {r["metric"] for r in report["changes"]}
    assert metrics >= {"probe_accuracy", "mso_centered@0.6", "mso_uncentered@0.9", "mso_uncentered_baseline@0.9"}
    assert not metrics & {"probe_n_test", "probe_n_train", "n_benign"}


def test_analyse_recordings_errors(two_steps):
    with pytest.raises(ValueError, match="steps \\[30\\] have no complete recording"):
        analyse_recordings(two_steps, steps=[0, 30])
    with pytest.raises(ValueError, match="no prompt set 'useful'"):
        analyse_recordings(two_steps, benign_set="useful")
    with pytest.raises(ValueError, match="no activations for set 'harmful', layer 2"):
        load_activations(two_steps, 0, "harmful", 2)


def test_write_report_files(two_steps, tmp_path):
    report = analyse_recordings(two_steps, etas=(0.5, 0.9))
    files = write_report(report, tmp_path)
    assert set(files) == {"analysis", "mso_vs_eta", "probe_by_layer"}
    for name in ("mso_vs_eta", "probe_by_layer"):
        assert files[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(files["analysis"].read_text())
    assert data["layers"] == json.loads(json.dumps(report["layers"]))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left
    table = summary_table(report)
    assert len(table.splitlines()) == 1 + len(report["layers"]) and "probe" in table and "n_test" in table
    # each MSO beside its own baseline: uncentered and centered columns carry different ones
    first = table.splitlines()[1].split()
    by = {(r["step"], r["layer"], r["centered"]): r for r in report["mso"] if r["eta"] == 0.5}
    plain, centered = by[(0, 1, False)], by[(0, 1, True)]
    assert first[5:9] == [f"{v:.3f}" for v in (plain["mso"], plain["baseline"], centered["mso"], centered["baseline"])]


def test_analyse_recordings_with_a_basis(two_steps):
    basis, _ = basis_with_known_range(0.25)
    report = analyse_recordings(two_steps, etas=(0.5,), basis=basis)
    by_layer = {(r["step"], r["layer"]): r for r in report["layers"]}
    assert 0.0 <= by_layer[(0, 1)]["cos_o_proj"] <= 1.0 and "cos_o_proj" not in by_layer[(0, 3)]
    assert {"cos_o_proj", "cos_down_proj"} <= {r["metric"] for r in report["changes"] if r["layer"] == 1}
    assert "cos_o_proj" in summary_table(report)
