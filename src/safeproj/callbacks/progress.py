"""ProgressLog: a line every N optimizer steps where no progress bar can be seen (a log file, a sweep's
run.log); `step_progress_bar`: Lightning's default bar without "Epoch 0/-2" in a step-bounded run."""

from __future__ import annotations

import math
import sys
import time

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress import ProgressBar
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

LINES_PER_RUN = 10  # lines of a run whose every_n_steps is not given


class ProgressLog(Callback):
    """Logs `step k/total, loss, seconds per step, time left` at the first optimizer step, every
    `every_n_steps` steps and the last, when stdout is not a terminal or the run has no progress bar.

    Args:
        every_n_steps: optimizer steps between lines; None gives about ten lines per run.
        always: log even beside a progress bar on a terminal.

    Raises:
        MisconfigurationException: every_n_steps that is not a positive integer.
    """

    def __init__(self, every_n_steps: int | None = None, always: bool = False) -> None:
        if every_n_steps is not None and (isinstance(every_n_steps, bool) or every_n_steps < 1):
            raise MisconfigurationException(f"ProgressLog every_n_steps={every_n_steps!r}: expected an integer >= 1")
        self.every_n_steps = every_n_steps
        self.always = always
        self._active = False
        self._total: float = math.inf
        self._every = 1
        self._started = 0.0
        self._first_step = 0
        self._last_step = 0

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._active = self.always or not sys.stdout.isatty() or trainer.progress_bar_callback is None
        self._total = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
        finite = math.isfinite(self._total)
        self._every = self.every_n_steps or (max(1, int(self._total) // LINES_PER_RUN) if finite else 10)
        self._started = time.monotonic()
        self._first_step = self._last_step = trainer.global_step

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if not self._active or step == self._last_step:  # no optimizer step in this batch (accumulation)
            return
        self._last_step = step
        if step - self._first_step == 1 or step % self._every == 0 or step == self._total:
            rank_zero_info(self.line(trainer))

    def line(self, trainer: Trainer) -> str:
        """`step 10/30 · train/loss 2.314 · 4.1 s/step · 1m22s left`."""
        step = trainer.global_step
        done = step - self._first_step
        per_step = (time.monotonic() - self._started) / max(1, done)
        parts = [f"step {step}/{int(self._total)}" if math.isfinite(self._total) else f"step {step}"]
        parts += [f"{k} {float(v):.4g}" for k, v in trainer.progress_bar_metrics.items() if "loss" in k]
        parts.append(f"{per_step:.3g} s/step")
        if math.isfinite(self._total):
            parts.append(f"{_duration(per_step * (self._total - step))} left")
        return " · ".join(parts)


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class _StepBoundedRichBar(RichProgressBar):
    """Rich's bar names the epoch as `Epoch k/max_epochs-1`: `Epoch 0/-2` when max_steps bounds the run."""

    @override
    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs not in (None, -1):
            return super()._get_train_description(current_epoch)
        description = f"Epoch {current_epoch} (max_steps {self.trainer.max_steps})"
        return f"{description:{len(self.validation_description)}}"


def step_progress_bar() -> ProgressBar:
    """The bar Lightning would choose (rich if installed, else tqdm), with a correct step-bounded description."""
    from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

    return _StepBoundedRichBar() if _RICH_AVAILABLE else TQDMProgressBar()
