"""NonFiniteGuard ends a diverging run as failed, keeps the last finite checkpoint and refuses NaN start weights."""

import json

import lightning as L
import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

from helpers.projection import TinyLM, loader
from safeproj.callbacks.nonfinite_guard import NonFiniteGuard
from safeproj.callbacks.summary import RunSummary
from safeproj.core.finite import NonFiniteError

WEIGHT = "model.model.layers.0.self_attn.q_proj.weight"


class Inject(Callback):
    """Puts a NaN into one weight (after the step) or one gradient (before it) at a chosen step."""

    def __init__(self, where: str, step: int):
        self.where, self.step = where, step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.where == "grad" and trainer.global_step + 1 == self.step:
            pl_module.get_parameter(WEIGHT).grad[0, 0] = float("nan")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.where == "weight" and trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.get_parameter(WEIGHT)[0, 0] = float("nan")


class NanLossLM(TinyLM):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step == 2 else loss


def _fit(tmp_path, module, callbacks, steps=5):
    checkpoints = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=1, save_last=True, save_on_exception=True
    )
    run = L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, callbacks=[*callbacks, NonFiniteGuard(), RunSummary(), checkpoints],
    )  # fmt: skip
    run.fit(module, loader(steps))
    return run


def _assert_failed_with_finite_last(tmp_path, step: int, match: str) -> None:
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and match in summary["reason"] and f"step {step}" in summary["reason"]
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert last["global_step"] == step - 1  # nothing of the failed step was saved
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values())


@pytest.mark.parametrize(
    ("module", "inject", "match"),
    [
        (NanLossLM, None, "non-finite loss at step 3"),
        (TinyLM, "grad", f"non-finite gradient of {WEIGHT} at step 3"),
        (TinyLM, "weight", f"non-finite weight {WEIGHT} after step 3"),
    ],
)
def test_non_finite_step_fails_the_run_and_keeps_the_last_finite_checkpoint(tmp_path, module, inject, match):
    callbacks = [Inject(inject, 3)] if inject else []
    with pytest.raises(NonFiniteError, match=match):
        _fit(tmp_path, module(), callbacks)
    _assert_failed_with_finite_last(tmp_path, 3, match)


def test_diverging_learning_rate_is_caught(tmp_path):
    with pytest.raises(NonFiniteError, match="non-finite"):
        _fit(tmp_path, TinyLM(optimizer="sgd", lr=1e30), [], steps=8)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed"
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values())


def test_non_finite_start_weights_are_refused(tmp_path):
    module = TinyLM()
    with torch.no_grad():
        module.get_parameter(WEIGHT)[1, 2] = float("inf")
    with pytest.raises(NonFiniteError, match=f"start weight {WEIGHT} at step 0"):
        _fit(tmp_path, module, [])
    assert not (tmp_path / "ckpt" / "last.ckpt").exists()


def test_finite_run_is_untouched(tmp_path):
    _fit(tmp_path, TinyLM(), [], steps=3)
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "done"
