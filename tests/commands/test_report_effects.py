"""The report's effect sizes from per-item values: known retentions come back, the verdicts follow the
intervals, runs whose items do not match their rows are left out, and the section and plot are written."""

import json
from pathlib import Path

import numpy as np
import pytest

from safeproj.commands.report import report_command
from safeproj.commands.report.effects import cell_effects, cell_items, parallel_pairs, run_items
from safeproj.commands.report.load import group_cells, load_runs

N_ITEMS = 40
SEEDS = (1, 2, 3)
# Retention of each variant's change, by the metric the fine-tune targets.
RETAINED = {("top", 0.5): 0.8, ("random", 0.5): 0.2}


@pytest.fixture(autouse=True)
def _no_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")


def _evaluation(label, metric, values):
    return {
        "label": label,
        "step": 0,
        "metrics": {metric: float(np.mean(values))},
        "items": [{"item": i, metric: float(v)} for i, v in enumerate(values)],
    }


def _write_run(root: Path, cell: str, seed: int, target: str) -> Path:
    """A post hoc run whose fine-tune moves `target` ("utility" or "harm") by a known amount per item."""
    rng = np.random.default_rng(seed)
    folder = root / cell / f"seed{seed}"
    folder.mkdir(parents=True)
    metrics = {"utility": "answer_nll", "harm": "comply_margin"}
    shift = {"utility": -1.0, "harm": 2.0}
    rows = [{"variant": "full", "selection": "full", "frac": 1.0, "keep": "none", "energy_kept": 1.0}]
    rows += [
        {
            "variant": f"{s}@{f:g}",
            "selection": s,
            "frac": f,
            "keep": "parallel",
            "energy_kept": 0.3 if s == "top" else 0.5,
        }
        for s, f in RETAINED
    ]
    for kind, metric in metrics.items():
        start = rng.normal(2.0, 0.5, N_ITEMS)
        moved = kind == target
        # Each fine-tune also moves the other metric a little, with less item noise: a larger z than its own.
        change = (
            shift[kind] + rng.normal(0, 0.2, N_ITEMS) if moved else 0.15 * shift[kind] + rng.normal(0, 0.005, N_ITEMS)
        )
        # A variant keeps the given share of each item's change, up to item noise.
        variants = [start + change]
        variants += [start + r * change + rng.normal(0, 0.02, N_ITEMS) for r in RETAINED.values()]
        evaluations = [_evaluation("start", metric, start)]
        evaluations += [_evaluation("full" if i == 0 else "evaluate", metric, v) for i, v in enumerate(variants)]
        for row, evaluation in zip(rows, evaluations[1:]):
            row[f"{kind}/{metric}"] = evaluation["metrics"][metric]
        payload = {"evaluator": kind, "prefix": kind, "evaluations": evaluations}
        (folder / f"{kind}_items.json").write_text(json.dumps(payload))
    summary = {
        "status": "done",
        "labels": {"cell": cell, "seed": seed, "recipe": cell.replace("-", "_"), "seed_keys": "seed_everything"},
        "metrics": {},
        "config": {"seed_everything": seed, "model": {"model": "tiny"}},
        "posthoc": rows,
    }
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


@pytest.fixture
def runs_dir(tmp_path):
    root = tmp_path / "runs"
    for seed in SEEDS:
        _write_run(root, "parallel-useful", seed, "utility")
        _write_run(root, "parallel-harmful", seed, "harm")
    return root


def test_items_are_matched_to_rows_and_stacked_by_seed(runs_dir):
    cells = group_cells(load_runs([runs_dir]))
    items = cell_items(cells["parallel-useful"], "utility", "answer_nll")
    assert items.seeds == list(SEEDS)
    assert set(items.values) == {"start", "full", *RETAINED}
    assert all(v.shape == (len(SEEDS), N_ITEMS) for v in items.values.values())
    run = cells["parallel-useful"][0]
    np.testing.assert_allclose(items.values["full"][0].mean(), run.posthoc[0]["utility/answer_nll"])


def test_a_run_whose_items_disagree_with_its_rows_is_left_out(runs_dir):
    path = runs_dir / "parallel-useful" / "seed2" / "utility_items.json"
    payload = json.loads(path.read_text())
    payload["evaluations"][2]["metrics"]["answer_nll"] += 0.5  # no longer the row's value
    path.write_text(json.dumps(payload))
    cells = group_cells(load_runs([runs_dir]))
    bad = next(r for r in cells["parallel-useful"] if r.seed == 2)
    assert run_items(bad, "utility", "answer_nll") == {}
    assert cell_items(cells["parallel-useful"], "utility", "answer_nll").seeds == [1, 3]


def test_known_retentions_and_verdicts(runs_dir):
    cells = group_cells(load_runs([runs_dir]))
    effects = {e.label: e for e in cell_effects(cells, "utility/answer_nll", "harm/comply_margin", n_boot=400)}
    useful, harmful = effects["parallel-useful"], effects["parallel-harmful"]
    assert useful.changes["utility"].z < -10 and harmful.changes["harm"].z > 10
    assert abs(useful.changes["harm"].z) > abs(useful.changes["utility"].z)  # the side effect is the surer one
    assert parallel_pairs(list(effects.values())) == [(harmful, useful)]

    from safeproj.commands.report.effects import retention_difference, retention_of

    for point, r in RETAINED.items():
        measured = retention_of(useful.items["utility"], point, 400)
        assert measured.effect.low < r < measured.effect.high
        assert abs(measured.effect.estimate - r) < 0.03
    top_vs_random = retention_difference(useful.items["utility"], ("top", 0.5), ("random", 0.5), 400)
    assert top_vs_random.effect.verdict == "positive"
    assert abs(top_vs_random.effect.estimate - 0.6) < 0.03


def test_report_writes_the_section_rows_and_plot(runs_dir, tmp_path):
    out = tmp_path / "report"
    written = report_command(str(runs_dir), out_dir=str(out), n_boot=300)
    text = Path(written["markdown"]).read_text()
    assert "## Effect sizes (items nested in seeds)" in text
    assert "R(top) − R(other)" in text
    assert "### Harm against utility: R_harm − R_utility" in text
    # Same retention (0.8) of harm and utility at top: no difference to find.
    rows = json.loads(Path(written["json"]).read_text())
    pair = [r for r in rows if r.get("kind") == "harm_minus_utility_parallel" and r["selection"] == "top"]
    assert len(pair) == 1 and pair[0]["verdict"] == "inconclusive"
    assert pair[0]["n_seeds"] == 3 and pair[0]["n_items"] == [N_ITEMS, N_ITEMS]
    (beyond,) = [r for r in rows if r.get("kind") == "harm_minus_utility_beyond_parallel"]
    assert beyond["selection"] == "top-random" and beyond["verdict"] == "inconclusive"
    changes = [r for r in rows if r.get("kind") == "change"]
    assert {r["cell"] for r in changes} == {"parallel-useful", "parallel-harmful"}
    assert (out / "retention_energy_parallel-useful.png").read_bytes().startswith(b"\x89PNG")
    assert "`harm/comply_margin`: mean per-token log-probability" in text and "no judge" in text


def test_runs_without_items_say_so(runs_dir, tmp_path):
    for path in runs_dir.rglob("*_items.json"):
        path.unlink()
    text = Path(report_command(str(runs_dir), out_dir=str(tmp_path / "r"), n_boot=50)["markdown"]).read_text()
    assert "No effect sizes: no run has per-item values" in text


def test_difference_of_differences_finds_a_subspace_that_favours_harm(runs_dir):
    # Make the harmful run's top variant keep 0.95 of the harm (random keeps 0.2) while the useful run's top
    # keeps 0.8 of the utility: top favours harm by 0.15 beyond what it does for utility, random by 0.
    from safeproj.commands.report.effects import harm_minus_utility

    cells = group_cells(load_runs([runs_dir]))
    harm = cell_items(cells["parallel-harmful"], "harm", "comply_margin")
    utility = cell_items(cells["parallel-useful"], "utility", "answer_nll")
    top, random = ("top", 0.5), ("random", 0.5)
    harm.values[top] = harm.values["start"] + 0.95 * (harm.values["full"] - harm.values["start"])
    d = harm_minus_utility(harm, (top, random), utility, (top, random), n_boot=400)
    assert d.effect.verdict == "positive" and abs(d.effect.estimate - 0.15) < 0.03
