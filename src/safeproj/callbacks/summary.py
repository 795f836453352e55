"""RunSummary: one `summary.json` per finished run, the sweep's "done" marker and the report's input.

The file holds the final metrics (as floats), the resolved config LightningCLI saved beside the run,
the post hoc projection rows if any, the global step and `"status": "done"` (`"empty"` when the run
made no optimizer step). It is written once, atomically, when `fit` has returned from every
`on_train_end` (the checkpoint and post hoc rows exist by then), so a crashed or killed run never has one.
A run stopped by `NonFiniteGuard` did finish, badly: it gets `"status": "failed"` and the guard's `"reason"`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from safeproj.core.finite import NonFiniteError
from safeproj.io import plain_float, plain_row, write_json
from safeproj.runs import CONFIG_FILE, FORMAT, POSTHOC_FILE, SUMMARY_FILE, metric_name


class RunSummary(Callback):
    """Writes `<default_root_dir>/summary.json` when a fit finishes.

    Metrics are the final `trainer.callback_metrics` plus the train-end results of evaluation
    callbacks (`UtilityEval`/`HarmEval` log those straight to the loggers, so they are not in
    `callback_metrics`). When an evaluator is off at train end because `PosthocProjection` scores the
    trained model as its "full" variant, that row's metrics are the run's final metrics.

    Args:
        filename: name of the file in the run's root directory.
        labels: extra plain values stored under "labels" (a sweep puts its sweep, cell, recipe and
            seed here).

    Raises:
        MisconfigurationException: a filename that is not a plain `*.json` name, or labels that
            are not a mapping of plain values.
    """

    def __init__(self, filename: str = SUMMARY_FILE, labels: dict[str, Any] | None = None) -> None:
        if not isinstance(filename, str) or not filename.endswith(".json") or Path(filename).name != filename:
            raise MisconfigurationException(
                f"RunSummary filename={filename!r}: expected a plain file name ending in .json"
            )
        labels = dict(labels or {})
        for key, value in labels.items():
            if not isinstance(key, str) or not (value is None or isinstance(value, (str, int, float, bool))):
                raise MisconfigurationException(
                    f"RunSummary labels[{key!r}]={value!r}: expected a plain string or number"
                )
        self.filename = filename
        self.labels = labels
        self.path: Path | None = None
        self._config_dirs: list[Path] = []
        self._started = time.time()

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # trainer.log_dir broadcasts, so every rank asks here, where LightningCLI saves config.yaml.
        dirs = [Path(trainer.default_root_dir)]
        log_dir = trainer.log_dir
        if log_dir:
            dirs.insert(0, Path(log_dir))
        self._config_dirs = dirs
        self._started = time.time()

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # on_fit_end follows every callback's and the module's on_train_end: a summary means the run,
        # its checkpoint and its post hoc rows are complete.
        if not trainer.is_global_zero or trainer.interrupted:
            return
        summary = self.collect(trainer)
        self.path = write_json(Path(trainer.default_root_dir) / self.filename, summary, allow_nan=False)
        rank_zero_info(f"RunSummary: {len(summary['metrics'])} metrics -> {self.path}")

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # Only divergence is recorded: it is a result (a rerun diverges again); other crashes stay unfinished.
        if not trainer.is_global_zero or not isinstance(exception, NonFiniteError):
            return
        summary = {**self.collect(trainer), "status": "failed", "reason": str(exception)}
        self.path = write_json(Path(trainer.default_root_dir) / self.filename, summary, allow_nan=False)
        rank_zero_info(f"RunSummary: failed ({exception}) -> {self.path}")

    def collect(self, trainer: Trainer) -> dict[str, Any]:
        """The summary as a JSON-able dict."""
        metrics = {k: v for k, v in ((k, plain_float(v)) for k, v in trainer.callback_metrics.items()) if v is not None}
        evaluators = [cb for cb in trainer.callbacks if getattr(cb, "prefix", None) and hasattr(cb, "last_metrics")]
        for cb in evaluators:
            if getattr(cb, "at_train_end", False):
                for key, value in cb.last_metrics.items():
                    number = plain_float(value)
                    if number is not None:
                        metrics[f"{cb.prefix}/{key}"] = number
        posthoc = self._posthoc_rows(trainer)
        full = next((row for row in posthoc if row.get("variant") == "full"), None)
        if full is not None:
            for key, value in full.items():
                name = metric_name(key)
                if name is not None and isinstance(value, float):
                    metrics.setdefault(name, value)
        return {
            "format": FORMAT,
            # A run that made no optimizer step (max_steps 0, no batches) did nothing: never "done".
            "status": "done" if trainer.global_step > 0 else "empty",
            "global_step": int(trainer.global_step),
            "root_dir": str(Path(trainer.default_root_dir).resolve()),
            "seconds": round(time.time() - self._started, 3),
            "labels": dict(self.labels),
            "metrics": dict(sorted(metrics.items())),
            "config": self._config(),
            "posthoc": posthoc,
        }

    def _config(self) -> dict[str, Any] | None:
        for directory in self._config_dirs:
            file = directory / CONFIG_FILE
            if file.is_file():
                loaded = yaml.safe_load(file.read_text())
                return loaded if isinstance(loaded, dict) else None
        return None

    @staticmethod
    def _posthoc_rows(trainer: Trainer) -> list[dict[str, Any]]:
        # Matched by name: importing the projection callback here would tie this light module to it.
        for cb in trainer.callbacks:
            if type(cb).__name__ == "PosthocProjection" and getattr(cb, "rows", None):
                return [plain_row(row) for row in cb.rows]
        file = Path(trainer.default_root_dir) / POSTHOC_FILE
        if file.is_file():
            return [plain_row(row) for row in json.loads(file.read_text())]
        return []

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"filename": self.filename, "labels": dict(self.labels)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Nothing to restore: the summary is written from the finished run's own state.
        pass
