"""`safeproj fit` runs read back from their directories: one directory per run, W&B identity, config,
diagnostics, the checkpoint artifact, and a resumed run that continues the same directory and W&B run."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers.projection import random_basis
from helpers.wandb_records import offline_runs, read_run
from safeproj.cli import main
from safeproj.commands.sweep.config import run_config
from safeproj.commands.sweep.spec import Cell
from safeproj.model.loading import load_model
from safeproj.runs import content_sha256

ROOT = Path(__file__).resolve().parents[2]
RECIPE = """
seed_everything: 0
model: {model: tiny, lr: 1.0e-3, warmup_ratio: 0.0}
data:
  sources: [{path: "builtin:useful", weight: 0.8}, {path: "builtin:harmful", weight: 0.2}]
  num_samples: 16
  val_fraction: 0.25
  batch_size: 2
  max_length: 192
trainer:
  max_steps: 3
  accelerator: cpu
  devices: 1
  log_every_n_steps: 1
  val_check_interval: 2
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: safeproj.callbacks.OnlineProjection
      init_args: {subspace: BASIS, keep: orthogonal, "on": update, frac: 0.25, log_every_n_steps: 1}
    - class_path: safeproj.callbacks.RunSummary
  logger:
    class_path: safeproj.wandb.WandbLogger
    init_args: {project: safeproj-test}
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs of one recipe with different overrides, one in a chosen folder, and that one resumed."""
    root = tmp_path_factory.mktemp("fit")
    basis = root / "b.safetensors"
    random_basis(load_model("tiny")[0], basis)
    recipe = root / "recipes" / "tinymix.yaml"
    recipe.parent.mkdir()
    recipe.write_text(RECIPE.replace("BASIS", str(basis)))
    chosen = root / "exp2"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        main(["fit", "--config", str(recipe)])
        main(["fit", "--config", str(recipe), "--model.lr", "2e-3", "--seed_everything", "1"])
        main(
            [
                "fit",
                "--config",
                str(recipe),
                "--trainer.default_root_dir",
                str(chosen),
                "--trainer.enable_checkpointing",
                "true",
                "--trainer.max_steps",
                "2",
            ]
        )
        [ckpt] = chosen.rglob("*.ckpt")
        main(["fit", "--config", str(recipe), "--ckpt_path", str(ckpt), "--trainer.max_steps", "4"])
    plain = sorted((root / "runs" / "tinymix").iterdir())
    return {"plain": plain, "chosen": chosen, "basis": basis}


def _files(folder: Path) -> set[Path]:
    # W&B links `debug*.log` to its process-wide service log: not a file of the run.
    return {p.resolve() for p in folder.rglob("*") if p.is_file() and not p.is_symlink()}


@pytest.mark.slow
def test_two_runs_of_one_recipe_have_their_own_complete_directories(runs):
    first, second = runs["plain"]
    assert first.name.startswith("tinymix-tiny-orthogonal-top-frac0.25-s0-")
    assert second.name.startswith("tinymix-tiny-orthogonal-top-frac0.25-s1-")
    assert not _files(first) & _files(second)
    for run in (first, second):
        config = yaml.safe_load((run / "config.yaml").read_text())
        summary = json.loads((run / "summary.json").read_text())
        assert Path(config["trainer"]["default_root_dir"]).resolve() == run.resolve()
        assert Path(config["trainer"]["logger"]["init_args"]["save_dir"]).resolve() == run.resolve()
        assert summary["root_dir"] == str(run.resolve()) and summary["status"] == "done"
        assert (run / "checkpoint" / "safeproj.json").is_file()
        [wandb_file] = offline_runs(run)
        recorded = read_run(wandb_file)
        assert recorded.config["checkpoint_dir"] == str((run / "checkpoint").resolve())
        assert json.loads((run / "run.json").read_text())["wandb_id"] == recorded.id


@pytest.mark.slow
def test_wandb_identity_config_and_diagnostics_of_a_plain_fit(runs):
    run = runs["plain"][0]
    recorded = read_run(offline_runs(run)[0])
    assert recorded.name == run.name and recorded.job_type == "train"
    assert recorded.group == "tinymix/tiny/orthogonal-top-frac0.25"  # the same for every seed
    assert read_run(offline_runs(runs["plain"][1])[0]).group == recorded.group
    assert {"tinymix", "keep=orthogonal", "on=update", "frac=0.25", "selection=top"} <= set(recorded.tags)
    config = recorded.config
    # The resolved config nested once: the model section is the section, not the model's name.
    assert config["model"]["model"] == "tiny" and config["model"]["lr"] == 1e-3
    assert "lr" not in config and "_instantiator" not in config
    assert config["trainer"]["max_steps"] == 3
    flat = {
        "projection.keep": "orthogonal",
        "projection.on": "update",
        "projection.frac": 0.25,
        "projection.selection": "top",
        "projection.side": "left",
        "projection.subspace": str(runs["basis"]),
        "data.mixture": "builtin:useful=0.8+builtin:harmful=0.2",
        "model.name": "tiny",
        "seed": 0,
    }
    assert {k: config[k] for k in flat} == flat
    assert config["projection.basis_sha256"] == content_sha256(runs["basis"])
    assert [step for step, _ in recorded.series("lr-AdamW")] == [0, 1, 2]
    shares = recorded.series("projection/removed_share")
    assert [step for step, _ in shares] == [1, 2, 3] and all(0 < share < 1 for _, share in shares)
    assert recorded.series("projection/removed_share/q")
    assert not [k for row in recorded.history for k in row if k.endswith(("_ci_low", "_ci_high"))]


@pytest.mark.slow
def test_the_checkpoint_is_a_model_artifact_by_reference_with_its_hash(runs):
    run = runs["plain"][0]
    recorded = read_run(offline_runs(run)[0])
    [artifact] = [a for a in recorded.artifacts if a.type == "model"]
    checkpoint = (run / "checkpoint").resolve()
    refs = {entry.ref for entry in artifact.manifest.contents}
    assert refs == {(checkpoint / p.name).as_uri() for p in checkpoint.iterdir() if p.is_file()}
    assert json.loads(artifact.metadata)["sha256"] == content_sha256(checkpoint)
    assert recorded.summary["checkpoint_sha256"] == content_sha256(checkpoint)


@pytest.mark.slow
def test_a_chosen_folder_holds_the_whole_run_and_a_resume_continues_its_wandb_run(runs):
    chosen = runs["chosen"]
    assert {"config.yaml", "run.json", "summary.json", "checkpoint", "wandb"} <= {p.name for p in chosen.iterdir()}
    assert not any((chosen.parent / "runs" / "tinymix").glob("*exp2*"))
    first, resumed = (read_run(f) for f in offline_runs(chosen))
    assert resumed.id == first.id and resumed.name == first.name and resumed.group == first.group
    assert [s for s, _ in first.series("train/loss")] == [0, 1]
    assert [s for s, _ in resumed.series("train/loss")] == [2, 3]  # the step axis continues
    assert json.loads((chosen / "summary.json").read_text())["global_step"] == 4


KILLED_RUN = """
import os, signal, sys, time
from safeproj.wandb import FLUSH_SECONDS, WandbLogger

logger = WandbLogger(project="safeproj-test", save_dir=sys.argv[1])
for step in range(5):
    logger.log_metrics({"train/loss": 1.0 / (step + 1)}, step=step)
time.sleep(2 * FLUSH_SECONDS + 1)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_offline_history_survives_a_kill(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline"}
    done = subprocess.run([sys.executable, "-c", KILLED_RUN, str(tmp_path)], env=env, timeout=120)
    assert done.returncode == -signal.SIGKILL
    [wandb_file] = offline_runs(tmp_path)
    assert [step for step, _ in read_run(wandb_file).series("train/loss")] == [0, 1, 2, 3, 4]


def test_a_sweep_cell_is_one_wandb_group_over_its_seeds(tmp_path):
    cell = Cell(name="online-frac=0.25", recipe=ROOT / "recipes" / "mixed.yaml", configs=[], overrides={})
    loggers = [run_config(cell, seed, tmp_path / f"seed{seed}", "s")["trainer"]["logger"] for seed in (0, 1)]
    first, second = (logger["init_args"] for logger in loggers)
    assert first["group"] == second["group"] == "s/online-frac=0.25"
    assert first["name"] == "s/online-frac=0.25/seed0" and second["name"] == "s/online-frac=0.25/seed1"
    assert {"sweep:s", "cell:online-frac=0.25"} <= set(first["tags"])
    assert first["save_dir"] == str(tmp_path / "seed0")


@pytest.mark.slow
def test_eval_of_a_run_checkpoint_is_an_eval_run_in_the_runs_group(runs, tmp_path):
    from safeproj.commands.eval import eval_command

    run = runs["plain"][0]
    out = tmp_path / "eval" / "eval.json"
    eval_command(str(run / "checkpoint"), out=str(out), num_samples=2, utility_max_new_tokens=4,
                 harm_max_new_tokens=4, batch_size=2, device="cpu")  # fmt: skip
    [wandb_file] = offline_runs(out.parent)
    recorded = read_run(wandb_file)
    trained = read_run(offline_runs(run)[0])
    assert recorded.job_type == "eval" and recorded.group == trained.group and recorded.id != trained.id
    assert recorded.config["model"] == str(run / "checkpoint") and recorded.config["reads"] == run.name
    assert recorded.summary["utility/n"] == 2 and "utility/strict_acc_ci_low" not in recorded.summary
    assert {"utility/samples", "harm/samples", "utility/intervals"} <= {k.split("/_")[0] for k in recorded.summary}


@pytest.mark.slow
def test_overlap_of_two_runs_is_an_overlap_run_with_its_tables(runs, tmp_path):
    from safeproj.commands.overlap import overlap_command

    first, second = runs["plain"]
    overlap_command(str(first / "checkpoint"), str(second / "checkpoint"), etas=[0.5], out_dir=str(tmp_path / "mso"))
    [wandb_file] = offline_runs(tmp_path / "mso")
    recorded = read_run(wandb_file)
    assert recorded.job_type == "overlap" and recorded.group == read_run(offline_runs(first)[0]).group
    assert {"overlap/model", "overlap/by_module", "overlap/plots"} <= {k.split("/_")[0] for k in recorded.summary}
