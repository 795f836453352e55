"""`safeproj report` on synthetic summary.json files: statistics, tables, missing cells, plots, errors."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from safeproj.commands.report import report_command
from safeproj.commands.report.load import load_runs
from safeproj.commands.report.stats import MISSING, difference_ci, summarize

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FRACS = (0.25, 0.75)
SELECTIONS = ("top", "random-k", "random")


@pytest.fixture(autouse=True)
def _no_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")


def _config(recipe, callbacks, seed):
    return {
        "seed_everything": seed,
        "model": {"model": "tiny-safety", "lr": 0.003},
        "data": {"num_samples": 32, "seed": seed},
        "trainer": {
            "max_steps": 4,
            "default_root_dir": f"/somewhere/seed{seed}",
            "callbacks": [
                *callbacks,
                {"class_path": "safeproj.callbacks.summary.RunSummary", "init_args": {"labels": {"seed": seed}}},
            ],
            "logger": {
                "class_path": "safeproj.wandb.WandbLogger",
                "init_args": {"project": "p", "save_dir": f"/somewhere/seed{seed}", "group": recipe},
            },
        },
    }


def _write(root: Path, cell: str, seed: int, recipe: str, metrics: dict, callbacks=(), posthoc=(), labels=True):
    folder = root / cell / f"seed{seed}"
    folder.mkdir(parents=True)
    summary = {
        "status": "done",
        "global_step": 4,
        "labels": {"cell": cell, "seed": seed, "recipe": recipe, "seed_keys": "seed_everything,data.seed"}
        if labels
        else {},
        "metrics": metrics,
        "config": _config(recipe, list(callbacks), seed),
        "posthoc": list(posthoc),
    }
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def _posthoc_rows(seed):
    # Utility rises and harm falls with frac in a known way; seed shifts both a little.
    rows = [
        {
            "variant": "full",
            "selection": "full",
            "frac": 1.0,
            "keep": "none",
            "energy_kept": 1.0,
            "flexible_acc": 0.6 + 0.01 * seed,
            "mean_score": 3.0 + 0.1 * seed,
        }
    ]
    for s, selection in enumerate(SELECTIONS):
        for frac in FRACS:
            rows.append(
                {
                    "variant": f"{selection}@{frac:g}",
                    "selection": selection,
                    "frac": frac,
                    "keep": "parallel",
                    "energy_kept": frac,
                    "flexible_acc": frac / 2 + 0.01 * seed + 0.1 * s,
                    "mean_score": 1.0 + frac + 0.1 * seed,
                }
            )
    return rows


def _online(frac, selection):
    return {
        "class_path": "safeproj.callbacks.online_projection.OnlineProjection",
        "init_args": {"subspace": "safety", "keep": "orthogonal", "on": "update", "frac": frac, "selection": selection},
    }


@pytest.fixture
def runs_dir(tmp_path):
    root = tmp_path / "runs"
    posthoc_cb = [
        {
            "class_path": "safeproj.callbacks.posthoc_projection.PosthocProjection",
            "init_args": {"subspace": "safety", "keep": "parallel"},
        }
    ]
    for seed in (0, 1, 2):
        rows = _posthoc_rows(seed)
        _write(
            root,
            "parallel-harmful",
            seed,
            "parallel_harmful",
            {"utility/flexible_acc": rows[0]["flexible_acc"], "harm/mean_score": rows[0]["mean_score"]},
            posthoc_cb,
            rows,
        )
        for frac in FRACS:
            for selection in ("top", "random"):
                metrics = {
                    "utility/flexible_acc": 0.3 + frac / 4 + 0.02 * seed,
                    "harm/mean_score": 2.0 - frac + 0.05 * seed,
                }
                if (frac, selection, seed) == (0.75, "random", 2):
                    del metrics["harm/mean_score"]  # one seed lacks a metric
                _write(
                    root,
                    f"online-frac={frac:g}-selection={selection}",
                    seed,
                    "mixed",
                    metrics,
                    [_online(frac, selection)],
                )
        _write(root, "unprojected", seed, "mixed", {"utility/flexible_acc": 0.5, "harm/mean_score": 4.0 - seed})
    # A cell measured by a single run, without harm at all.
    _write(root, "single", 0, "useful", {"utility/flexible_acc": 0.4})
    return root


def test_bootstrap_interval_contains_the_mean_and_is_seeded():
    values = [0.1, 0.4, 0.35, 0.8, 0.2]
    stat = summarize(values, n_boot=500)
    assert stat.mean == pytest.approx(np.mean(values))
    assert stat.low <= stat.mean <= stat.high and stat.low >= min(values) and stat.high <= max(values)
    assert stat.high - stat.low > 0
    again = summarize(values, n_boot=500)
    assert (again.low, again.high) == (stat.low, stat.high)
    # Missing values are left out, not counted as zero.
    partial = summarize([0.5, None, float("nan"), 0.7])
    assert partial.mean == pytest.approx(0.6) and (partial.n, partial.total) == (2, 4)
    single = summarize([0.3])
    assert single.n == 1 and math.isnan(single.low) and "CI n/a" in single.cell()
    assert summarize([None, None]).cell() == MISSING


def test_difference_interval_separates_distinct_groups():
    a, b = [0.1, 0.12, 0.09, 0.11], [0.5, 0.52, 0.49, 0.51]
    low, high = difference_ci(a, b, n_boot=500)
    assert 0 < low <= np.mean(b) - np.mean(a) <= high
    low, high = difference_ci(a, a, n_boot=500)
    assert low <= 0 <= high


def test_report_tables_numbers_and_plots(runs_dir, tmp_path):
    out = tmp_path / "report"
    written = report_command([str(runs_dir)], out_dir=str(out), n_boot=200)
    text = (out / "report.md").read_text()
    rows = json.loads((out / "report.json").read_text())

    # Post hoc table: rows per selection, columns per frac, values = mean over the 3 seeds.
    post = [r for r in rows if r["kind"] == "posthoc" and r["selection"] == "random-k" and r["frac"] == 0.75]
    assert len(post) == 1
    expected = np.mean([0.75 / 2 + 0.01 * s + 0.1 for s in (0, 1, 2)])
    assert post[0]["utility/flexible_acc"] == pytest.approx(expected)
    assert post[0]["utility/flexible_acc_ci_low"] <= expected <= post[0]["utility/flexible_acc_ci_high"]
    assert post[0]["utility/flexible_acc_n"] == 3
    assert "## parallel-harmful: post hoc (parallel)" in text
    assert "full fine-tuning (no projection): 0.610" in text  # mean of 0.60, 0.61, 0.62
    # Shaped as the paper's tables: the full fine-tuning column beside the frac columns, in every row.
    header = next(line for line in text.splitlines() if line.startswith("| selection \\ frac") and "full FT" in line)
    assert header.split("|")[-2].strip() == "full FT"
    block = text.split("## parallel-harmful: post hoc (parallel)")[1].split("**harm")[0]
    grid_rows = [line for line in block.splitlines() if line.startswith(("| top", "| random"))]
    assert grid_rows and all(line.split("|")[-2].strip().startswith("0.610") for line in grid_rows)

    # Online table: one family (mixed, orthogonal) over frac × selection, the unprojected cell as reference.
    online = [r for r in rows if r["kind"] == "online" and r["selection"] != "reference"]
    assert {(r["selection"], r["frac"]) for r in online} == {(s, f) for s in ("top", "random") for f in FRACS}
    top = next(r for r in online if (r["selection"], r["frac"]) == ("top", 0.25))
    assert top["harm/mean_score"] == pytest.approx(np.mean([2.0 - 0.25 + 0.05 * s for s in (0, 1, 2)]))
    ref = next(r for r in rows if r["kind"] == "online" and r["selection"] == "reference")
    assert ref["harm/mean_score"] == pytest.approx(3.0)
    assert "no projection (cell unprojected)" in text

    # The missing metric is counted, not invented: n=2 of 3 for that cell, and "—" where nothing exists.
    missing = next(r for r in online if (r["selection"], r["frac"]) == ("random", 0.75))
    assert missing["harm/mean_score_n"] == 2
    assert missing["harm/mean_score"] == pytest.approx(np.mean([2.0 - 0.75 + 0.05 * s for s in (0, 1)]))
    assert "n=2/3" in text
    single_line = next(line for line in text.splitlines() if line.startswith("| single "))
    assert single_line.rstrip(" |").endswith(MISSING) and "CI n/a" in single_line

    for key in ("tradeoff_posthoc_parallel-harmful", "pareto", "markdown", "json", "csv"):
        assert key in written, key
    pngs = sorted(out.glob("*.png"))
    assert {p.name for p in pngs} >= {
        "pareto.png",
        "tradeoff_posthoc_parallel-harmful.png",
        "tradeoff_online_online.png",
    }
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in pngs)
    assert not list(out.glob(".*"))  # no temp files left


def test_mso_outputs_become_a_table_and_curve(runs_dir, tmp_path):
    for seed, shift in ((0, 0.0), (1, 0.1)):
        folder = runs_dir / "after" / "safety-useful" / f"seed{seed}"
        folder.mkdir(parents=True)
        rows = [
            {"name": f"t{i}", "eta": eta, "mso": eta / 2 + shift + 0.01 * i, "baseline": eta / 10}
            for i in range(3)
            for eta in (0.3, 0.9)
        ]
        (folder / "mso.json").write_text(json.dumps(rows))
        (folder / "after.json").write_text(json.dumps({"name": "safety-useful", "seed": seed, "status": "done"}))
    out = tmp_path / "report"
    report_command([str(runs_dir)], out_dir=str(out), n_boot=200)
    rows = [r for r in json.loads((out / "report.json").read_text()) if r["kind"] == "mso"]
    at = {r["eta"]: r for r in rows}
    # Model mean per seed (over tensors), then over seeds: 0.9/2 + 0.01 + mean(0, 0.1).
    assert at[0.9]["mso"] == pytest.approx(0.45 + 0.01 + 0.05)
    assert at[0.3]["baseline"] == pytest.approx(0.03) and at[0.3]["mso_n"] == 2
    assert "## Mode Subspace Overlap" in (out / "report.md").read_text()
    assert (out / "mso_vs_eta.png").read_bytes()[:8] == PNG_MAGIC


def test_compare_puts_two_groups_side_by_side(runs_dir, tmp_path):
    out = tmp_path / "report"
    report_command([str(runs_dir)], out_dir=str(out), compare=["online-frac=0.25-*", "unprojected"], n_boot=200)
    text = (out / "report.md").read_text()
    assert "## Comparison" in text and "A: online-frac=0.25-* (6 runs)" in text and "B: unprojected (3 runs)" in text
    line = next(row for row in text.splitlines() if row.startswith("| harm/mean_score "))
    a = np.mean([2.0 - 0.25 + 0.05 * s for s in (0, 1, 2) for _ in range(2)])
    assert f"{3.0 - a:+.3f}" in line
    with pytest.raises(ValueError, match="matches no run"):
        report_command([str(runs_dir)], out_dir=str(out), compare=["nothing-*", "unprojected"])
    with pytest.raises(ValueError, match="two runs or groups"):
        report_command([str(runs_dir)], out_dir=str(out), compare=["unprojected"])


def test_index_file_is_an_input(runs_dir, tmp_path):
    index = runs_dir / "index.jsonl"
    index.write_text(
        json.dumps({"kind": "run", "cell": "unprojected", "seed": 0, "dir": "unprojected/seed0"})
        + "\n"
        + json.dumps({"kind": "run", "cell": "single", "seed": 0, "dir": "single/seed0"})
        + "\n"
    )
    runs = load_runs([str(index)])
    assert sorted(r.cell for r in runs) == ["single", "unprojected"]


def test_empty_or_missing_folders_are_named(tmp_path):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "config.yaml").write_text("a: 1\n")
    with pytest.raises(ValueError, match=f"{empty}: no summary.json") as err:
        report_command([str(empty)], out_dir=str(tmp_path / "r"))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="no such file"):
        report_command([str(tmp_path / "absent")], out_dir=str(tmp_path / "r"))
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "summary.json").write_text(json.dumps({"status": "running"}))
    with pytest.raises(ValueError, match="unfinished"):
        load_runs([str(unfinished)])


def test_one_cell_from_two_recipes_is_refused(tmp_path):
    root = tmp_path / "mixed-up"
    _write(root / "a", "cell", 0, "useful", {"utility/flexible_acc": 0.1})
    _write(root / "b", "cell", 1, "harmful", {"utility/flexible_acc": 0.2})
    with pytest.raises(ValueError, match=r"mixed-up: cell 'cell' mixes runs with recipes harmful, useful"):
        report_command([str(root)], out_dir=str(tmp_path / "r"))


def test_runs_without_labels_group_by_config(tmp_path):
    root = tmp_path / "plain"
    for seed in (0, 1):
        _write(root, f"x{seed}", seed, "useful", {"utility/flexible_acc": 0.1 * seed}, labels=False)
    _write(root, "y", 0, "harmful", {"utility/flexible_acc": 0.9}, labels=False)
    cells = {r.cell for r in load_runs([str(root)])}
    assert len(cells) == 2  # the two useful seeds share a cell; the harmful run is its own


def test_wandb_table_in_an_offline_run(runs_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "report"
    written = report_command([str(runs_dir)], out_dir=str(out), n_boot=50)
    assert "wandb" in written
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))


def test_callback_seeds_named_in_seed_keys_do_not_split_a_cell():
    from safeproj.commands.report.load import cell_config

    def config(seed, frac=0.25):
        posthoc = {"class_path": "safeproj.callbacks.PosthocProjection", "init_args": {"seed": seed, "fracs": [frac]}}
        return {"seed_everything": seed, "trainer": {"callbacks": [posthoc]}}

    keys = ["seed_everything", "PosthocProjection.seed"]
    assert cell_config(config(1), keys) == cell_config(config(2), keys)
    assert cell_config(config(1), keys) != cell_config(config(1, frac=0.5), keys)  # other arguments still count
    assert cell_config(config(1), ["seed_everything"]) != cell_config(config(2), ["seed_everything"])
