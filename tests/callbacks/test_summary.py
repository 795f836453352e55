"""RunSummary writes summary.json once a fit has finished, and never for a run that crashed."""

import json
import math

import lightning as L
import pytest
import torch
import yaml
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Callback
from torch.utils.data import DataLoader, TensorDataset

from safeproj.callbacks.summary import RunSummary
from safeproj.io import plain_float
from safeproj.runs import metric_name


class Regression(L.LightningModule):
    """Least squares on fixed data; logs its loss and can fail at a chosen step."""

    def __init__(self, fail_at: int | None = None):
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.fail_at = fail_at

    def training_step(self, batch, batch_idx):
        if self.fail_at is not None and self.global_step == self.fail_at:
            raise RuntimeError("simulated crash")
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class FinalScore(Callback):
    """An evaluator as the eval callbacks are: a prefix, `at_train_end`, results in `last_metrics`."""

    prefix = "utility"

    def __init__(self, at_train_end: bool = True):
        self.at_train_end = at_train_end
        self.last_metrics = {}

    def on_train_end(self, trainer, pl_module):
        # Results of train-end evaluations go to the loggers, not to callback_metrics.
        self.last_metrics = {"flexible_acc": 0.75, "strict_acc": float("nan")}


class WritesPosthoc(Callback):
    """Leaves post hoc rows where PosthocProjection writes them (unprefixed evaluator keys)."""

    def __init__(self, rows):
        self.rows_to_write = rows

    def on_train_end(self, trainer, pl_module):
        folder = trainer.default_root_dir + "/posthoc"
        import os

        os.makedirs(folder, exist_ok=True)
        with open(folder + "/posthoc.json", "w") as f:
            json.dump(self.rows_to_write, f)


def _fit(tmp_path, callbacks, steps=3, fail_at=None):
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(16, 3), torch.randn(16, 1))
    trainer = L.Trainer(
        max_steps=steps,
        callbacks=callbacks,
        default_root_dir=str(tmp_path),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Regression(fail_at), DataLoader(data, batch_size=4))
    return trainer


def test_a_run_without_an_optimizer_step_is_empty_not_done(tmp_path):
    _fit(tmp_path, [RunSummary()], steps=0)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "empty" and summary["global_step"] == 0


def test_summary_holds_final_metrics_config_and_status(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"seed_everything": 3, "model": {"lr": 0.1}}))
    summary_cb = RunSummary(labels={"cell": "a", "seed": 3})
    trainer = _fit(tmp_path, [summary_cb, FinalScore()])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "done" and summary["global_step"] == 3
    assert summary["labels"] == {"cell": "a", "seed": 3}
    assert summary["config"] == {"seed_everything": 3, "model": {"lr": 0.1}}
    # The logged loss is the trainer's own last value, as a plain float.
    assert summary["metrics"]["train/loss"] == pytest.approx(float(trainer.callback_metrics["train/loss"]))
    assert summary["metrics"]["utility/flexible_acc"] == 0.75
    # NaN is left out rather than written as a number.
    assert "utility/strict_acc" not in summary["metrics"]
    assert summary["posthoc"] == []
    assert not list(tmp_path.glob(".summary.json-*"))  # no temp file left behind


def test_evaluator_off_at_train_end_takes_the_full_posthoc_row(tmp_path):
    rows = [
        {
            "variant": "full",
            "selection": "full",
            "frac": 1.0,
            "keep": "none",
            "energy_kept": 1.0,
            "flexible_acc": 0.5,
            "mean_score": 2.0,
            "refusal_rate": float("nan"),
        },
        {
            "variant": "top@0.5",
            "selection": "top",
            "frac": 0.5,
            "keep": "parallel",
            "energy_kept": 0.4,
            "flexible_acc": 0.25,
            "mean_score": 1.5,
        },
    ]
    # The evaluator's last_metrics hold the last variant it scored, not the trained model: not used.
    _fit(tmp_path, [RunSummary(), FinalScore(at_train_end=False), WritesPosthoc(rows)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["metrics"]["utility/flexible_acc"] == 0.5
    assert summary["metrics"]["harm/mean_score"] == 2.0
    assert "harm/refusal_rate" not in summary["metrics"]
    assert summary["posthoc"][1]["flexible_acc"] == 0.25
    assert summary["posthoc"][0]["refusal_rate"] is None


def test_crashed_run_leaves_no_summary(tmp_path):
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(tmp_path, [RunSummary()], steps=5, fail_at=2)
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.parametrize("kwargs", [{"filename": "a/b.json"}, {"filename": "summary.txt"}, {"labels": {"x": [1]}}])
def test_bad_arguments_are_refused(kwargs):
    with pytest.raises(MisconfigurationException):
        RunSummary(**kwargs)


def test_metric_names_and_plain_floats():
    assert metric_name("flexible_acc") == "utility/flexible_acc"
    assert metric_name("mean_score_ci_low") == "harm/mean_score_ci_low"
    assert metric_name("val/loss") == "val/loss"
    assert metric_name("energy_kept") is None
    assert plain_float(torch.tensor(2.5)) == 2.5
    assert plain_float(float("inf")) is None and plain_float("x") is None and plain_float(True) is None
    assert not math.isnan(plain_float(1))
