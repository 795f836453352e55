"""A fit killed with SIGKILL and resumed from its last Lightning checkpoint continues an uninterrupted fit:
the same per-step loss from the resume point, the same final weights, the same W&B run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers.projection import random_basis
from helpers.wandb_records import offline_runs, read_run
from safeproj.model.loading import load_model

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
STEPS, EVERY = 12, 4
# The mixed recipe on the tiny preset, cut to online projection only: no evaluation, no validation, and a
# ModelCheckpoint every EVERY steps (added on the command line).
OVERRIDES = {
    "data": {"num_samples": 32, "val_fraction": 0.0, "batch_size": 2, "max_length": 192},
    "trainer": {
        "max_steps": STEPS,
        "val_check_interval": 1.0,
        "enable_checkpointing": True,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "callbacks": [
            {
                "class_path": "safeproj.callbacks.OnlineProjection",
                "init_args": {"subspace": "BASIS", "keep": "orthogonal", "on": "update", "frac": 0.25},
            },
            {"class_path": "safeproj.callbacks.NonFiniteGuard"},
            {"class_path": "safeproj.callbacks.RunSummary"},
        ],
    },
}


def _command(root: Path, run_dir: Path, *extra: str) -> list[str]:
    checkpoints = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {
            "dirpath": str(run_dir / "ckpts"),
            "every_n_train_steps": EVERY,
            "save_top_k": -1,
            "save_last": True,
        },
    }
    # fmt: off
    return [
        sys.executable, "-m", "safeproj.cli", "fit",
        "--config", str(ROOT / "recipes" / "mixed.yaml"),
        "--config", str(ROOT / "configs" / "model" / "tiny.yaml"),
        "--config", str(root / "short.yaml"),
        "--model.model", "tiny",
        "--trainer.callbacks+", json.dumps(checkpoints),
        "--trainer.default_root_dir", str(run_dir),
        *extra,
    ]
    # fmt: on


def _env() -> dict:
    # Without WANDB_SERVICE each fit starts its own W&B service, as a fit from a shell does; a service
    # shared with this test process would keep the killed fit's run id "in use" for the resumed one.
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    return {**env, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)}


def _fit(root: Path, run_dir: Path, *extra: str) -> None:
    log = run_dir.with_suffix(".log")
    with log.open("a") as out:
        code = subprocess.call(_command(root, run_dir, *extra), env=_env(), stdout=out, stderr=out, timeout=300)
    assert code == 0, log.read_text()[-3000:]


def _killed_and_resumed(root: Path, run_dir: Path, step: int) -> None:
    """Fit until `step` steps are done, SIGKILL the process there, resume from `last.ckpt`."""
    marker = root / f"paused-{step}"
    pause = {"class_path": "helpers.pause.PauseAt", "init_args": {"step": step, "marker": str(marker)}}
    log = run_dir.with_suffix(".log")
    with log.open("a") as out:
        proc = subprocess.Popen(
            _command(root, run_dir, "--trainer.callbacks+", json.dumps(pause)), env=_env(), stdout=out, stderr=out
        )
        try:
            deadline = time.monotonic() + 240
            while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            assert marker.exists(), log.read_text()[-3000:]
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=30) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert not (run_dir / "summary.json").exists() and not (run_dir / "checkpoint").exists()
    _fit(root, run_dir, "--ckpt_path", str(run_dir / "ckpts" / "last.ckpt"))


def _losses(run_dir: Path) -> list[dict[int, float]]:
    return [dict(read_run(f).series("train/loss")) for f in offline_runs(run_dir)]


@pytest.fixture(scope="module")
def fits(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    # A random basis stands in for Δ_S of `tiny`: safety-tuning the preset first would take longer than the test.
    random_basis(load_model("tiny")[0], root / "basis.safetensors")
    overrides = yaml.safe_load(yaml.safe_dump(OVERRIDES))
    overrides["trainer"]["callbacks"][0]["init_args"]["subspace"] = str(root / "basis.safetensors")
    (root / "short.yaml").write_text(yaml.safe_dump(overrides))
    _fit(root, root / "whole")
    _killed_and_resumed(root, root / "boundary", EVERY * 2)  # killed right after the step-8 checkpoint
    _killed_and_resumed(root, root / "between", EVERY + 2)  # killed two steps past the step-4 checkpoint
    return root


KILLED = [("boundary", EVERY * 2), ("between", EVERY)]  # (run, the step of its last checkpoint)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "resumed_at"), KILLED)
def test_a_killed_fit_resumes_with_the_same_losses_in_the_same_wandb_run(fits, name, resumed_at):
    whole, run = fits / "whole", fits / name
    for folder in (whole, run):
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["status"] == "done" and summary["global_step"] == STEPS
    [reference] = _losses(whole)
    assert sorted(reference) == list(range(STEPS))
    _, resumed = _losses(run)
    # The resumed part of the W&B history has every step from the checkpoint on, with the same loss bit for bit.
    assert resumed == {s: reference[s] for s in range(resumed_at, STEPS)}
    # Both processes wrote to the W&B run named in run.json (the id ends each offline folder's name).
    info = json.loads((run / "run.json").read_text())
    killed_file, resumed_file = offline_runs(run)
    recorded = read_run(resumed_file)
    assert killed_file.parent.name.endswith(f"-{info['wandb_id']}") and recorded.id == info["wandb_id"]
    assert recorded.name == info["name"] and recorded.group == info["group"]
    ends = [load_file(folder / "checkpoint" / "model.safetensors") for folder in (whole, run)]
    assert ends[0].keys() == ends[1].keys()
    for key in ends[0]:
        torch.testing.assert_close(ends[1][key], ends[0][key], rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "resumed_at"), KILLED)
def test_a_killed_fit_resumes_to_the_same_weights_bit_for_bit(fits, name, resumed_at):
    weights = "checkpoint/model.safetensors"
    assert (fits / name / weights).read_bytes() == (fits / "whole" / weights).read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize(("name", "resumed_at"), KILLED)
def test_the_wandb_history_of_a_killed_fit_holds_the_steps_before_its_checkpoint(fits, name, resumed_at):
    killed, _ = _losses(fits / name)
    assert set(range(resumed_at)) <= set(killed)
