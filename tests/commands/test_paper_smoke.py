"""recipes/sweeps/paper-smoke.yaml: the paper's sweep with offline stand-ins, end to end, then its report tables."""

import json
from pathlib import Path

import pytest

from safeproj.commands.report import report_command
from safeproj.commands.sweep import sweep_command
from safeproj.commands.sweep.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]
PAPER = ROOT / "recipes" / "sweeps" / "paper.yaml"
SMOKE = ROOT / "recipes" / "sweeps" / "paper-smoke.yaml"
FRACS = ("0.01", "0.25", "0.5", "0.75", "0.99")
SELECTIONS = ("top", "random-k", "random")


def test_the_smoke_spec_has_the_paper_specs_cells_and_grids():
    paper, smoke = load_spec(PAPER), load_spec(SMOKE)
    assert [f"paper/{c.name}" for c in paper.cells] == [c.name for c in smoke.cells]
    for big, small in zip(paper.cells, smoke.cells):
        for key in ("PosthocProjection.fracs", "PosthocProjection.selections", "PosthocProjection.subspace"):
            assert big.overrides.get(key) == small.overrides.get(key), (small.name, key)
        assert not any("qwen" in c.name or "paper" in c.name for c in small.configs), small.configs
    assert smoke.seeds == [0]


@pytest.mark.slow
def test_paper_smoke_runs_end_to_end_and_reports_the_papers_tables(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    out = tmp_path / "paper-smoke"
    result = sweep_command(str(SMOKE), str(out))
    assert result["total"] == 10 and result["ran"] == 10 and result["failed"] == 0

    for reference in ("alignment", "safety"):
        for name in ("useful", "harmful", "mixed"):
            summary = json.loads(
                (out / "paper" / f"{name}-subspace={reference}" / "seed0" / "summary.json").read_text()
            )
            assert summary["status"] == "done" and summary["global_step"] == 4
            assert len(summary["posthoc"]) == 1 + len(FRACS) * len(SELECTIONS)  # the full model and the grid

    written = report_command([str(out)], out_dir=str(tmp_path / "report"), n_boot=100)
    text = Path(written["markdown"]).read_text()
    assert "judged by the refusal-phrase keyword proxy" in text  # no LLM judge here, and the report says so
    for title in ("useful-subspace=alignment: post hoc (parallel)", "mixed-subspace=safety: post hoc (orthogonal)"):
        section = text.split(f"## paper/{title}")[1].split("\n## ")[0]
        for metric in ("utility/flexible_acc", "harm/mean_score"):
            table = section.split(f"**{metric}**")[1].split("\n\n")[1].splitlines()
            assert table[0] == f"| selection \\ frac | {' | '.join(FRACS)} | full FT |", title
            assert [row.split("|")[1].strip() for row in table[2:]] == list(SELECTIONS)
            assert all("—" not in row for row in table[2:]), (title, metric)
    assert "## paper/extension-online: online projection (orthogonal, recipe mixed)" in text
