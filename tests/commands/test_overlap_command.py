"""`safeproj overlap` end to end on checkpoints written in a temp dir, basis artifacts, and the plot helpers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from safeproj import plots
from safeproj.commands.overlap import overlap_command
from safeproj.core.basis import build_basis
from safeproj.core.deltas import delta_from_spec
from safeproj.core.overlap import mso_table
from safeproj.model.subspaces import load_subspaces

PNG = b"\x89PNG\r\n\x1a\n"


def is_png(path) -> bool:
    return Path(path).read_bytes()[:8] == PNG


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_command_writes_tables_plots_and_a_summary(tmp_path, checkpoint_pair, capsys):
    a, b = checkpoint_pair
    out = tmp_path / "out"
    written = overlap_command(a, b, etas=[0.8, 0.2, 0.5], out_dir=str(out), energy=True, fracs=[0.25, 0.5])
    rows = read_csv(out / "mso.csv")
    assert len(rows) == 14 * 3
    assert {r["eta"] for r in rows} == {"0.2", "0.5", "0.8"}
    assert json.loads((out / "mso.json").read_text())[0].keys() == rows[0].keys()
    assert {r["module"] for r in read_csv(out / "mso_by_module.csv")} == {"q", "k", "v", "o", "gate", "up", "down"}
    assert {r["layer"] for r in read_csv(out / "mso_by_layer.csv")} == {"0", "1"}
    assert len(read_csv(out / "mso_model.csv")) == 3
    for name in ("mso_vs_eta.png", "mso_ratio_heatmap.png", "energy_retained.png"):
        assert is_png(out / name), name
    energy = read_csv(out / "energy.csv")
    assert len([r for r in energy if r["scope"] == "pooled"]) == 2 * 3
    assert set(written) >= {"rows_csv", "mso_plot", "ratio_heatmap", "energy_plot"}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left behind
    printed = capsys.readouterr().out
    assert "14 tensors" in printed
    model_lines = [line for line in printed.splitlines() if line.startswith("model ")]
    assert [line.split()[1] for line in model_lines] == ["0.2", "0.5", "0.8"]


def test_command_module_filter(tmp_path, checkpoint_pair):
    a, b = checkpoint_pair
    overlap_command(a, b, etas=[0.5], modules=["q", "down"], out_dir=str(tmp_path))
    assert {r["module"] for r in read_csv(tmp_path / "mso.csv")} == {"q", "down"}
    known = "known module types: q, k, v, o, gate, up, down"
    with pytest.raises(ValueError, match=rf"unknown module type 'query'; {known}"):
        overlap_command(a, b, modules=["query"], out_dir=str(tmp_path))


def test_command_refuses_bad_input(tmp_path, checkpoint_pair):
    a, _ = checkpoint_pair
    with pytest.raises(ValueError, match="eta"):
        overlap_command(a, a, etas=[0.5, 2.0], out_dir=str(tmp_path))
    with pytest.raises(ValueError, match="side"):
        overlap_command(a, a, side="both", out_dir=str(tmp_path))
    with pytest.raises(ValueError, match="cannot read a delta"):
        overlap_command(a, str(tmp_path / "nowhere"), out_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        overlap_command(str(tmp_path / "missing.safetensors"), a, out_dir=str(tmp_path))


def test_basis_artifact_with_spectrum_gives_the_deltas_overlap(tmp_path, checkpoint_pair):
    a, b = checkpoint_pair
    path = tmp_path / "a.safetensors"
    build_basis(delta_from_spec(a), frac=0.5, selection="top", progress=False).save(path)
    etas = [0.1, 0.3, 0.5, 0.9]
    reference = {(r["name"], r["eta"]): r for r in mso_table(delta_from_spec(a), delta_from_spec(b), etas)}
    with pytest.warns(UserWarning, match="need more top vectors than the basis artifact stores"):
        rows = mso_table(load_subspaces(str(path)), delta_from_spec(b), etas)
    assert {r["eta"] for r in rows} >= {0.1, 0.3}  # small η fit in the stored half of the spectrum
    assert len(rows) < len(reference)  # η = 0.9 needs more than half of a white spectrum
    for row in rows:
        expected = reference[(row["name"], row["eta"])]
        assert (row["k_v"], row["k_w"]) == (expected["k_v"], expected["k_w"])
        assert row["mso"] == pytest.approx(expected["mso"], abs=1e-5)


def test_basis_without_usable_top_vectors_is_refused(tmp_path, checkpoint_pair):
    a, b = checkpoint_pair
    complement = tmp_path / "complement.safetensors"
    build_basis(delta_from_spec(a), frac=0.9, progress=False).save(complement)  # stores U⊥, not U_k
    with pytest.raises(ValueError, match="no η could be evaluated"):
        overlap_command(str(complement), b, etas=[0.9], out_dir=str(tmp_path))
    random_k = tmp_path / "random_k.safetensors"
    build_basis(delta_from_spec(a), frac=0.25, selection="random-k", progress=False).save(random_k)
    with pytest.raises(ValueError, match="selection='random-k'"):
        overlap_command(str(random_k), b, out_dir=str(tmp_path))


def test_line_plot_and_heatmap_write_pngs_and_check_input(tmp_path):
    series = {"q": ([0.1, 0.5], [0.2, 0.4])}
    path = plots.line_plot(series, tmp_path / "sub" / "l.png", baseline=([0.1, 0.5], [0.1, 0.1]))
    assert is_png(path)
    grid = [[1.0, float("nan")], [0.5, 3.0]]
    path = plots.heatmap(grid, tmp_path / "h.png", row_labels=["0", "1"], col_labels=["a", "b"], center=1.0)
    assert is_png(path)
    with pytest.raises(ValueError, match="2 x values but 1 y"):
        plots.line_plot({"q": ([0.1, 0.5], [0.2])}, tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"\.png"):
        plots.line_plot({"q": ([0.1], [0.2])}, tmp_path / "x.jpg")
    with pytest.raises(ValueError, match="row labels"):
        plots.heatmap([[1.0, 2.0]], tmp_path / "y.png", row_labels=["0", "1"], col_labels=["a", "b"])
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "y.png").exists()
