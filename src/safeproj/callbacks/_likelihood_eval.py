"""The shared base of the likelihood evaluation callbacks: scheduling, start and full values, retention, items.

A likelihood evaluator scores the model once before training (`at_fit_start`), optionally at validation
end and at train end, and whenever post hoc projection calls `evaluate(pl_module)` for a weight variant.
It remembers the metric of the start model and of the fully fine-tuned one, and adds to every later
result, per tracked metric, `<metric>_start`, `<metric>_full` and `<metric>_retention` with
R = (start − variant) / (start − full). Per-item values go to a W&B table and, with `out_dir`, to
`<out_dir>/<prefix>_items.json` (every evaluation in order: start, validations, then train end or the
post hoc variants in the order of PosthocProjection's rows).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from safeproj.callbacks._generation_eval import _model_and_tokenizer, _rank_and_world, check_count
from safeproj.eval.ranks import gather_rows
from safeproj.eval.stats import retention


class LikelihoodEval(Callback):
    """Subclasses set `prefix`, `tracked` (metrics that get start/full/retention columns), and implement
    `_run` (score this rank's share: metrics, rows) and `_report` (bootstrap summary of all rows)."""

    prefix = ""
    tracked: tuple[str, ...] = ()

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        max_length: int,
        every_n_val: int,
        at_validation: bool,
        at_train_end: bool,
        at_fit_start: bool,
        log_table: bool,
        out_dir: str | None,
        n_boot: int,
    ):
        check_count("num_samples", num_samples)
        check_count("batch_size", batch_size)
        check_count("max_length", max_length, minimum=2)
        check_count("every_n_val", every_n_val)
        check_count("n_boot", n_boot)
        self.num_samples, self.batch_size, self.max_length = num_samples, batch_size, max_length
        self.every_n_val = every_n_val
        self.at_validation = bool(at_validation)
        self.at_train_end = bool(at_train_end)
        self.at_fit_start = bool(at_fit_start)
        self.log_table = bool(log_table)
        self.out_dir = out_dir
        self.n_boot = n_boot
        self.validations_seen = 0
        self.start_metrics: dict[str, float] = {}
        self.full_metrics: dict[str, float] = {}
        self.last_metrics: dict[str, float] = {}
        self.last_rows: list[dict] = []
        self.evaluations: list[dict] = []
        self._training = False  # between on_train_start and the full model's evaluation
        self._posthoc_scores_full = True

    # ---------------------------------------------------------------- work

    def _run(self, model, tokenizer, rank: int, world_size: int) -> tuple[dict[str, float], list[dict]]:
        raise NotImplementedError

    def _report(self, rows: list[dict]) -> dict[str, float]:
        raise NotImplementedError

    def evaluate(self, pl_module: LightningModule) -> dict[str, float]:
        """Metrics (without prefix) for the module's current weights, with retention columns once the start
        and full values are known; per-item rows in `last_rows`.

        During a fit, the first call from outside this callback's hooks after training started scores the
        trained weights (PosthocProjection scores its unprojected "full" variant first) and is kept as
        the full value.
        """
        label = "evaluate"
        if self._training and self._posthoc_scores_full and not self.full_metrics:
            label = "full"
        return self._evaluate(pl_module, label)

    def _evaluate(self, pl_module: LightningModule, label: str) -> dict[str, float]:
        model, tokenizer = _model_and_tokenizer(pl_module)
        rank, world_size = _rank_and_world(pl_module)
        metrics, rows = self._run(model, tokenizer, rank, world_size)
        rows = gather_rows(rows, world_size)
        # Synced torchmetrics values win over the row-based ones (identical on one process).
        result = {**self._report(rows), **metrics}
        tracked = {k: result[k] for k in self.tracked if k in result}
        if label == "start":
            self.start_metrics = tracked
        elif label in ("full", "train_end") and not self.full_metrics:
            self.full_metrics = tracked
            self._training = False
        result.update(self.retention_columns(result, self.start_metrics, self.full_metrics))
        self.last_rows = rows
        self._record(pl_module, label, result, rows)
        return result

    @staticmethod
    def retention_columns(
        result: dict[str, float], start: dict[str, float], full: dict[str, float]
    ) -> dict[str, float]:
        """`<metric>_start`, `<metric>_full` and `<metric>_retention` for every metric with both references."""
        out = {}
        for name in start:
            if name in full and name in result:
                out[f"{name}_start"] = start[name]
                out[f"{name}_full"] = full[name]
                out[f"{name}_retention"] = retention(start[name], full[name], result[name])
        return out

    # ---------------------------------------------------------------- hooks

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # A module without `.model` or `.tokenizer` fails here, not after all of training.
        _model_and_tokenizer(pl_module)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # A resumed run keeps the start value from its checkpoint: the weights here are no longer the start.
        if not self.at_fit_start or self.start_metrics:
            return
        metrics = self._evaluate(pl_module, "start")
        start = {f"{self.prefix}/{k}_start": float(v) for k, v in metrics.items() if k in self.tracked}
        self._log(trainer, start, "start")

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._training = not self.full_metrics
        skips_full = [cb for cb in trainer.callbacks if getattr(cb, "include_full", True) is False]
        self._posthoc_scores_full = not skips_full
        if skips_full and self.at_fit_start:
            rank_zero_warn(
                f"{type(self).__name__}: {type(skips_full[0]).__name__}(include_full=False) scores no full variant, "
                "so post hoc rows get no retention columns unless at_train_end=True runs first"
            )

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.at_validation or trainer.sanity_checking:
            return
        self.validations_seen += 1
        if self.validations_seen % self.every_n_val:
            return
        self.last_metrics = self._evaluate(pl_module, "validation")
        pl_module.log_dict(self._prefixed(self.last_metrics), on_step=False, on_epoch=True, sync_dist=False)
        self._log_items(trainer)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.at_train_end:
            return
        self.last_metrics = self._evaluate(pl_module, "train_end")
        self._log(trainer, self._prefixed(self.last_metrics), "train_end")

    # ---------------------------------------------------------------- output

    def _prefixed(self, metrics: dict[str, float]) -> dict[str, float]:
        return {f"{self.prefix}/{k}": float(v) for k, v in metrics.items()}

    def _log(self, trainer: Trainer, metrics: dict[str, float], label: str) -> None:
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
            shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if not k.endswith(("_low", "_high")))
            rank_zero_info(f"{type(self).__name__} ({label}): {shown}")
        self._log_items(trainer)

    def _log_items(self, trainer: Trainer) -> None:
        if self.log_table and self.last_rows:
            from safeproj.wandb import log_table

            log_table(
                trainer.loggers, f"{self.prefix}/{self.tracked[0]}_items", self.last_rows, step=trainer.global_step
            )

    def _record(self, pl_module: LightningModule, label: str, result: dict[str, float], rows: list[dict]) -> None:
        trainer = pl_module._trainer  # None outside a Trainer
        step = int(trainer.global_step) if trainer is not None else None
        self.evaluations.append({"label": label, "step": step, "metrics": dict(result), "items": rows})
        if self.out_dir is None or (trainer is not None and not trainer.is_global_zero):
            return
        from safeproj.io import plain_row, write_json

        evaluations = [{**e, "metrics": plain_row(e["metrics"])} for e in self.evaluations]
        payload = {"evaluator": type(self).__name__, "prefix": self.prefix, "evaluations": evaluations}
        write_json(Path(self.out_dir) / f"{self.prefix}_items.json", payload, allow_nan=False)

    # ---------------------------------------------------------------- state

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "validations_seen": self.validations_seen,
            "start_metrics": dict(self.start_metrics),
            "full_metrics": dict(self.full_metrics),
            "last_metrics": dict(self.last_metrics),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.validations_seen = int(state_dict.get("validations_seen", 0))
        self.start_metrics = dict(state_dict.get("start_metrics", {}))
        self.full_metrics = dict(state_dict.get("full_metrics", {}))
        self.last_metrics = dict(state_dict.get("last_metrics", {}))
