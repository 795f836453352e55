"""recipes/sweeps/smoke.yaml end to end: real runs in subprocesses, after-steps, then the report."""

import json
from pathlib import Path

import pytest

from safeproj.commands.report import report_command
from safeproj.commands.sweep import runner, sweep_command

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "recipes" / "sweeps" / "smoke.yaml"
CELLS = ("parallel-useful", "parallel-harmful", "online-frac=0.5-selection=random", "unprojected", "reference")
SEEDS = (1, 2)
AFTER = ("safety-useful", "safety-harmful", "useful-harmful", "safety-reference", "reference-harmful")


@pytest.mark.slow
def test_smoke_sweep_runs_every_analysis_and_reports_them(tmp_path, monkeypatch):
    # The runs log to CSV; the report's W&B table has its own test.
    monkeypatch.setenv("WANDB_MODE", "disabled")
    launched = []
    real_launch = runner.launch

    def counting(cmd, log, env, **kwargs):
        launched.append(cmd)
        return real_launch(cmd, log, env, **kwargs)

    monkeypatch.setattr(runner, "launch", counting)
    out = tmp_path / "smoke"
    result = sweep_command(str(SMOKE), str(out))
    assert result["total"] == 10 and result["ran"] == 10 and result["failed"] == 0

    for cell in CELLS:
        for seed in SEEDS:
            run = out / cell / f"seed{seed}"
            summary = json.loads((run / "summary.json").read_text())
            assert summary["status"] == "done" and summary["global_step"] == 4, run
            assert summary["labels"]["cell"] == cell and summary["config"]["data"]["seed"] == seed
            assert (run / "checkpoint" / "safeproj.json").is_file()
    # Post hoc rows: full + 2 fracs × 2 selections, parallel and orthogonal alike.
    assert len(json.loads((out / "parallel-harmful" / "seed1" / "summary.json").read_text())["posthoc"]) == 5
    assert len(json.loads((out / "unprojected" / "seed2" / "summary.json").read_text())["posthoc"]) == 5
    assert (out / "unprojected" / "seed1" / "activations" / "analysis.json").is_file()
    for pair in AFTER:
        for seed in SEEDS:
            assert (out / "after" / pair / f"seed{seed}" / "mso.json").is_file()
    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert sum(r["kind"] == "run" for r in index) == 10 and sum(r["kind"] == "after" for r in index) == 10

    # Starting the finished sweep again launches nothing.
    count = len(launched)
    again = sweep_command(str(SMOKE), str(out))
    assert len(launched) == count and again["skipped"] == 10

    written = report_command([str(out)], out_dir=str(tmp_path / "report"), n_boot=200)
    text = Path(written["markdown"]).read_text()
    for heading in (
        "## Cells",
        "## parallel-useful: post hoc (parallel)",
        "## parallel-harmful: post hoc (parallel)",
        "## unprojected: post hoc (orthogonal)",
        "## online: online projection (orthogonal, recipe mixed)",
        "## Pareto plot",
        "## Mode Subspace Overlap",
        "## Activations",
    ):
        assert heading in text, heading
    for kind in (
        "pareto",
        "mso_vs_eta",
        "tradeoff_posthoc_parallel-useful",
        "tradeoff_posthoc_parallel-harmful",
        "tradeoff_posthoc_unprojected",
        "tradeoff_online_online",
    ):
        assert Path(written[kind]).read_bytes()[:4] == b"\x89PNG", kind
    rows = json.loads(Path(written["json"]).read_text())
    # Every (selection, frac) of the parallel grid has utility and harm from both seeds. The tiny model's
    # replies are degenerate, which no judge scores, so the generation spot check of harm is its
    # non-refusal rate (degenerate replies count as non-refusals, never as safe).
    grid = [r for r in rows if r["table"].startswith("parallel-harmful") and r["selection"] != "reference"]
    assert len(grid) == 4 and all(r["utility/flexible_acc_n"] == 2 and r["harm/refusal_rate_n"] == 2 for r in grid)
    assert all(r["utility/answer_nll_n"] == 2 and r["harm/comply_margin_n"] == 2 for r in grid)
