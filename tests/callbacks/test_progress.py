"""Progress where no bar is seen, and a bar that counts a step-bounded run right."""

import lightning as L
import pytest
from lightning.fabric.utilities.exceptions import MisconfigurationException

from safeproj.callbacks import ProgressLog
from safeproj.callbacks.progress import step_progress_bar


def _fit(tiny_lm, tmp_path, callbacks, max_steps=4, **kwargs):
    trainer = L.Trainer(
        max_steps=max_steps, callbacks=callbacks, logger=False, enable_checkpointing=False,
        enable_model_summary=False, default_root_dir=tmp_path, **kwargs,
    )  # fmt: skip
    trainer.fit(tiny_lm())
    return trainer


def test_lines_every_n_steps_and_at_the_end(tiny_lm, tmp_path, caplog):
    # Under pytest stdout is not a terminal, as in a log file.
    with caplog.at_level("INFO"):
        _fit(tiny_lm, tmp_path, [ProgressLog(every_n_steps=2)], max_steps=5, enable_progress_bar=False)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [line.split(" · ")[0] for line in lines] == ["step 1/5", "step 2/5", "step 4/5", "step 5/5"]
    assert all("s/step" in line and "left" in line for line in lines)


def test_one_line_per_optimizer_step_under_accumulation(tiny_lm, tmp_path, caplog):
    with caplog.at_level("INFO"):
        _fit(tiny_lm, tmp_path, [ProgressLog(every_n_steps=1)], max_steps=2, accumulate_grad_batches=2,
             enable_progress_bar=False)  # fmt: skip
    steps = [r.getMessage().split(" · ")[0] for r in caplog.records if r.getMessage().startswith("step ")]
    assert steps == ["step 1/2", "step 2/2"]


def test_bar_beside_a_terminal_stays_quiet(tiny_lm, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    with caplog.at_level("INFO"):
        _fit(tiny_lm, tmp_path, [ProgressLog(every_n_steps=1), step_progress_bar()], max_steps=2)
    assert not [r for r in caplog.records if r.getMessage().startswith("step ")]


def test_step_bounded_bar_names_no_negative_epoch(tiny_lm, tmp_path):
    from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

    if not _RICH_AVAILABLE:
        pytest.skip("tqdm's bar names no epoch count")
    bar = step_progress_bar()
    trainer = _fit(tiny_lm, tmp_path, [bar], max_steps=2)
    description = bar._get_train_description(trainer.current_epoch)
    assert "-2" not in description and "max_steps 2" in description


def test_every_n_steps_must_be_positive():
    with pytest.raises(MisconfigurationException, match="every_n_steps"):
        ProgressLog(every_n_steps=0)
