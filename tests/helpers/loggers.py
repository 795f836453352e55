"""Loggers for callback tests: one that keeps every logged metric, a WandbLogger that keeps tables offline,
and a short fit of the evaluation TinyLM that logs to them."""

from __future__ import annotations

import tempfile

from lightning.pytorch import Trainer
from lightning.pytorch.loggers import Logger, WandbLogger

from helpers.evaluation import TinyLM


class MemoryLogger(Logger):
    """Keeps (step, metrics) for every `log_metrics` call."""

    def __init__(self):
        super().__init__()
        self.records: list[tuple[int | None, dict]] = []

    @property
    def name(self):
        return "memory"

    @property
    def version(self):
        return 0

    def log_metrics(self, metrics, step=None):
        self.records.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def keyed(self, key: str) -> list[tuple[int | None, dict]]:
        """The records that hold `key`."""
        return [(step, m) for step, m in self.records if key in m]


class RecordingWandb(WandbLogger):
    """A WandbLogger that records tables instead of starting a W&B run."""

    def __init__(self):
        super().__init__(project="safeproj-test", offline=True)
        self.tables: dict[str, tuple[list, list]] = {}

    def log_table(self, key, columns=None, data=None, dataframe=None, step=None):
        self.tables[key] = (columns, data)

    def log_metrics(self, metrics, step=None):
        pass

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def save(self):
        pass

    def finalize(self, status):
        pass

    @property
    def version(self):
        return "offline"

    @property
    def experiment(self):  # the Trainer touches it in setup; no W&B run may start
        return None


def fit_tiny_lm(callbacks, loggers=False, epochs=2, root_dir=None):
    """`epochs` epochs of two training batches and one validation batch (after one sanity batch) on CPU.

    Files callbacks write beside the run go to `root_dir` (default a fresh temporary folder, never the
    working directory).
    """
    trainer = Trainer(
        default_root_dir=root_dir or tempfile.mkdtemp(prefix="safeproj-fit-"),
        max_epochs=epochs,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=1,
        accelerator="cpu",
        logger=loggers,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module = TinyLM()
    trainer.fit(module)
    return trainer, module
