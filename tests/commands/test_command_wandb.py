"""Standalone commands log to a W&B run of their own (offline), in the group of the run they read."""

import json
import time
from pathlib import Path

import pytest
import torch

from helpers.wandb_records import offline_runs, read_run, records
from safeproj.commands.activations import activations_command
from safeproj.commands.project import project_command
from safeproj.commands.report import log_wandb
from safeproj.runs import RUN_INFO, RUN_MANIFEST

RUN_INFO_VALUES = {"name": "mixed-s0-x", "group": "mixed/cell", "project": "safeproj-test"}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def _one_run(folder: Path, wait: float = 30.0):
    """The one offline run under `folder`, once its `.wandb` file ends with the exit record: W&B writes the
    file in the background every `safeproj.wandb.FLUSH_SECONDS`, so a finished run can still be on its way."""
    files = offline_runs(folder)
    assert len(files) == 1, files
    deadline = time.monotonic() + wait
    while not _has_exit(files[0]):
        assert time.monotonic() < deadline, f"{files[0]} has no exit record after {wait} s"
        time.sleep(0.2)
    return read_run(files[0])


def _has_exit(file: Path) -> bool:
    try:
        return any(r.WhichOneof("record_type") == "exit" for r in records(file))
    except Exception:  # a record half written
        return False


def _logged_keys(run) -> set[str]:
    """Keys of the logged tables and images (their history items are nested: `<key>/_type`, `<key>/nrows`, ...)."""
    return {k.removesuffix("/_type") for row in run.history for k in row if k.endswith("/_type")}


def _tiny_run(root: Path) -> Path:
    """A finished run folder (run.json) whose checkpoint is a perturbed copy of a saved tiny base model."""
    from safeproj.model.loading import tiny_model

    base, tok = tiny_model()
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    tuned, _ = tiny_model()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for p in tuned.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    ckpt = root / "run" / "checkpoint"
    tuned.save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    (ckpt / RUN_MANIFEST).write_text(json.dumps({"base": str(root / "base"), "lora": False}))
    (root / "run" / RUN_INFO).write_text(json.dumps(RUN_INFO_VALUES))
    return ckpt


def test_project_logs_its_rows_in_the_group_of_the_run(tmp_path):
    ckpt = _tiny_run(tmp_path)
    project_command(
        str(ckpt), f"{ckpt},{tmp_path / 'base'}", fracs=[0.5], selections=["top"], utility=False, harm=False
    )
    run = _one_run(tmp_path / "run" / "posthoc")
    assert (run.job_type, run.group) == ("project", "mixed/cell")
    assert run.config["reads"] == "mixed-s0-x" and run.config["keep"] == "parallel"
    assert "project/posthoc" in _logged_keys(run)
    nrows = [r["project/posthoc/nrows"] for r in run.history if "project/posthoc/nrows" in r]
    assert nrows == [2]  # the full run and one variant


def test_activations_logs_tables_and_plots(prompt_files, tmp_path):
    sets, _, _ = prompt_files
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / RUN_INFO).write_text(json.dumps(RUN_INFO_VALUES))
    out = tmp_path / "run" / "activations"
    activations_command("tiny", out_dir=str(out), layers=[1], prompt_sets=sets, num_prompts=8, etas=[0.5])
    run = _one_run(out)
    assert (run.job_type, run.group) == ("activations", "mixed/cell")
    assert {"activations/layers", "activations/mso", "activations/plots"} <= _logged_keys(run)


def test_report_logs_rows_and_images_in_a_report_run(tmp_path, monkeypatch):
    from safeproj.plots.activations import plot_layers

    image = plot_layers([{"step": 0, "layer": 1, "probe_accuracy": 0.5, "diff_norm": 1.0}], tmp_path / "fig.png")
    rows = [{"cell": "a", "value": 1.0}, {"cell": "b", "ci_low": 0.5}]  # columns: the union of the rows' keys
    out = tmp_path / "report"
    files_dir = log_wandb(out, rows, [Path(image)])
    run = _one_run(out)
    assert (run.job_type, run.group) == ("report", "")
    assert {"report/rows", "report/fig"} <= _logged_keys(run)
    table = next(Path(files_dir).glob("media/table/report/rows_*.table.json"))
    assert json.loads(table.read_text())["columns"] == ["cell", "value", "ci_low"]
    assert log_wandb(out, [], [Path(image)]) is None
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert log_wandb(tmp_path / "off", rows, []) is None
    assert not (tmp_path / "off").exists()
