"""Run by test_fsdp_guard.py: SafeprojLM (tiny) over two FSDP2 processes (gloo) with NonFiniteGuard, a NaN
put into rank 1's rows of one weight only: at the start (`start`) or after step 2 (`step`).

Each rank writes the message it stopped with to <out>/rank<r>.txt. A short collective timeout ends a
rank left waiting in a collective, so a disagreement fails the test instead of hanging it.
"""

import sys
from datetime import timedelta

import lightning as L
import torch
from lightning.pytorch import Callback

from helpers.fsdp_worker import fsdp_trainer, halves
from safeproj.callbacks.nonfinite_guard import NonFiniteGuard
from safeproj.model.module import SafeprojLM

WEIGHT = "model.model.layers.0.self_attn.q_proj.weight"


class PoisonRankOne(Callback):
    """A NaN in rank 1's shard of WEIGHT, before the guard looks (callbacks run in list order)."""

    def __init__(self, phase: str):
        self.phase = phase

    def on_train_start(self, trainer, pl_module):
        if self.phase == "start":
            self._poison(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.phase == "step" and trainer.global_step == 2:
            self._poison(trainer, pl_module)

    def _poison(self, trainer, pl_module):
        if trainer.global_rank == 1:
            with torch.no_grad():
                pl_module.get_parameter(WEIGHT).to_local()[0, 0] = float("nan")


class Record(Callback):
    def __init__(self, out: str):
        self.out = out

    def on_exception(self, trainer, pl_module, exception):
        with open(f"{self.out}/rank{trainer.global_rank}.txt", "w") as handle:
            handle.write(f"{type(exception).__name__}: {exception}")


def main(out, phase):
    L.seed_everything(0)
    module = SafeprojLM("tiny", lr=1e-2, warmup_ratio=0.0)
    data = halves(2)
    # Short: a rank left waiting in a collective ends the test instead of hanging it.
    callbacks = [PoisonRankOne(phase), NonFiniteGuard(), Record(out)]
    trainer = fsdp_trainer(2, out, callbacks, timeout=timedelta(seconds=60))
    trainer.fit(module, data)


if __name__ == "__main__":
    main(*sys.argv[1:])
