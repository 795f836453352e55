"""Run by test_ddp_stall.py: two CPU ranks (gloo) with a short collective timeout; rank 1 stops itself
(SIGSTOP, as a hung or suspended process would) before its third step. Rank 0 must end with an error."""

import os
import signal
import sys
from datetime import timedelta

import lightning as L
from lightning.pytorch import Callback
from lightning.pytorch.strategies import DDPStrategy

from helpers.projection import TinyLM, loader


class StallRankOne(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == 1 and trainer.global_step == 2:
            print(f"stalling rank 1 pid {os.getpid()}", flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)


def main(seconds):
    trainer = L.Trainer(
        max_steps=6, accelerator="cpu", devices=2, strategy=DDPStrategy(timeout=timedelta(seconds=float(seconds))),
        use_distributed_sampler=False, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[StallRankOne()],
    )  # fmt: skip
    trainer.fit(TinyLM(optimizer="sgd"), loader(6))


if __name__ == "__main__":
    main(*sys.argv[1:])
