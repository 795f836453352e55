"""A callback that holds a fit still at a chosen step, so a test can kill it at a known point."""

import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback

from safeproj.wandb import FLUSH_SECONDS


class PauseAt(Callback):
    """Before the batch that would make step `step + 1`, waits for W&B to flush, writes `marker`, then sleeps."""

    def __init__(self, step: int, marker: str) -> None:
        self.step = step
        self.marker = marker

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            time.sleep(2 * FLUSH_SECONDS + 1)  # the offline history up to here is on disk before the kill
            Path(self.marker).write_text(str(self.step))
            time.sleep(600)
