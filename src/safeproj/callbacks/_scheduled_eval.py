"""The shared base of every evaluation callback: argument checks, scheduling, scoring across ranks, logging, state.

An evaluator runs at validation end (if enabled, every n-th validation) and at train end, logs its
numbers under its prefix (`utility/`, `harm/`) with confidence bounds in the table `<prefix>/intervals`
instead of extra scalar series, logs its per-item rows to W&B when a WandbLogger is attached, and
exposes `evaluate(pl_module)` so post hoc projection can score each weight variant without a Trainer.
Under a distributed run every rank must call `evaluate`: each scores its share of the items and the
summed metric states are synced.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from safeproj.eval.gsm8k import BUILTIN_PREFIX, builtin_split
from safeproj.eval.ranks import gather_rows
from safeproj.wandb import log_table, split_intervals


def check_count(name: str, value: int, minimum: int = 1) -> None:
    """MisconfigurationException naming `name` unless `value` is an integer >= minimum (bools refused)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise MisconfigurationException(f"`{name}` must be an integer >= {minimum}, got {value!r}")


def check_dataset(dataset: str, kind: str) -> None:
    """MisconfigurationException for an empty name or a built-in set of the wrong kind ("useful", "harmful")."""
    if not isinstance(dataset, str) or not dataset:
        raise MisconfigurationException(f"`dataset` must be a non-empty string, got {dataset!r}")
    if dataset.startswith(BUILTIN_PREFIX):
        try:
            builtin_split(dataset, kind)
        except ValueError as err:
            raise MisconfigurationException(f"`dataset`: {err}") from None


def model_and_tokenizer(pl_module: LightningModule):
    """The module's `.model` and `.tokenizer`; MisconfigurationException naming whichever is missing."""
    missing = [a for a in ("model", "tokenizer") if getattr(pl_module, a, None) is None]
    if missing:
        raise MisconfigurationException(
            f"{type(pl_module).__name__} has no {' or '.join(missing)}: evaluation needs `.model` "
            "(the Hugging Face causal LM) and `.tokenizer` (its tokenizer) on the LightningModule"
        )
    return pl_module.model, pl_module.tokenizer


def rank_and_world(pl_module: LightningModule) -> tuple[int, int]:
    """(global rank, world size) of the module's Trainer; (0, 1) outside a Trainer or on one process."""
    trainer = pl_module._trainer  # None outside a Trainer; `.trainer` would raise
    if trainer is None or trainer.world_size == 1:
        return 0, 1
    return trainer.global_rank, trainer.world_size


class ScheduledEval(Callback):
    """Subclasses set `prefix`, the attributes `dataset`, `num_samples`, `batch_size` and `seed`, and implement
    `_run` (score this rank's share: metrics, rows), `_report` (bootstrap summary of all rows) and
    `_evaluate(pl_module, label)` (score and keep the result; `label` says which hook asked)."""

    prefix = ""

    def __init__(self, every_n_val: int, at_validation: bool, at_train_end: bool, log_table: bool, n_boot: int):
        check_count("every_n_val", every_n_val)
        check_count("n_boot", n_boot)
        self.every_n_val = every_n_val
        self.at_validation = bool(at_validation)
        self.at_train_end = bool(at_train_end)
        self.log_table = bool(log_table)
        self.n_boot = n_boot
        self.validations_seen = 0
        self.last_metrics: dict[str, float] = {}
        self.last_rows: list[dict] = []

    # ---------------------------------------------------------------- work

    def _run(self, model, tokenizer, rank: int, world_size: int) -> tuple[dict[str, float], list[dict]]:
        raise NotImplementedError

    def _report(self, rows: list[dict]) -> dict[str, float]:
        raise NotImplementedError

    def _evaluate(self, pl_module: LightningModule, label: str) -> dict[str, float]:
        raise NotImplementedError

    def evaluate(self, pl_module: LightningModule) -> dict[str, float]:
        """Metrics (without prefix) for the module's current weights; per-item rows in `last_rows`."""
        return self._evaluate(pl_module, "evaluate")

    def _share(self, rank: int, world_size: int) -> dict[str, Any]:
        """The arguments every metric function takes: the items to draw and this rank's share of them."""
        return {
            "dataset": self.dataset,
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "rank": rank,
            "world_size": world_size,
            "progress": rank == 0,
        }

    def _score(self, pl_module: LightningModule) -> tuple[dict[str, float], list[dict]]:
        """Metrics and per-item rows of all ranks for the module's current weights."""
        model, tokenizer = model_and_tokenizer(pl_module)
        rank, world_size = rank_and_world(pl_module)
        metrics, rows = self._run(model, tokenizer, rank, world_size)
        rows = gather_rows(rows, world_size)
        # Synced torchmetrics values win over the row-based ones (identical on one process).
        return {**self._report(rows), **metrics}, rows

    # ---------------------------------------------------------------- hooks

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # A module without `.model` or `.tokenizer` fails here, not after all of training.
        model_and_tokenizer(pl_module)

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.at_validation or trainer.sanity_checking:
            return
        self.validations_seen += 1
        if self.validations_seen % self.every_n_val:
            return
        self.last_metrics = self._evaluate(pl_module, "validation")
        scalars = self._scalars(trainer, self._prefixed(self.last_metrics))
        pl_module.log_dict(scalars, on_step=False, on_epoch=True, sync_dist=False)
        self._log_rows(trainer)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.at_train_end:
            return
        self.last_metrics = self._evaluate(pl_module, "train_end")
        self._log(trainer, self._prefixed(self.last_metrics), "train_end")

    # ---------------------------------------------------------------- output

    def _prefixed(self, metrics: dict[str, float]) -> dict[str, float]:
        return {f"{self.prefix}/{k}": float(v) for k, v in metrics.items()}

    def _scalars(self, trainer: Trainer, metrics: dict[str, float]) -> dict[str, float]:
        """`metrics` without confidence bounds; the bounds go to the table `<prefix>/intervals`."""
        scalars, rows = split_intervals(metrics)
        log_table(trainer.loggers, f"{self.prefix}/intervals", rows, step=trainer.global_step)
        return scalars

    def _log(self, trainer: Trainer, metrics: dict[str, float], label: str) -> None:
        """Prefixed `metrics` to every logger (rank zero) and a line of them to the console, then the rows."""
        if trainer.is_global_zero:
            scalars = self._scalars(trainer, metrics)
            for logger in trainer.loggers:
                logger.log_metrics(scalars, step=trainer.global_step)
            shown = ", ".join(f"{k}={v:.4g}" for k, v in scalars.items() if not k.endswith(("_low", "_high")))
            rank_zero_info(f"{type(self).__name__} ({label}): {shown}")
        self._log_rows(trainer)

    def _rows_key(self) -> str:
        """W&B key of the per-item table."""
        return f"{self.prefix}/samples"

    def _log_rows(self, trainer: Trainer) -> None:
        if self.log_table and self.last_rows:
            log_table(trainer.loggers, self._rows_key(), self.last_rows, step=trainer.global_step)

    # ---------------------------------------------------------------- state

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"validations_seen": self.validations_seen, "last_metrics": dict(self.last_metrics)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.validations_seen = int(state_dict.get("validations_seen", 0))
        self.last_metrics = dict(state_dict.get("last_metrics", {}))
