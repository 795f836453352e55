"""The shared base of the likelihood evaluation callbacks: start and full values, retention, items.

Scheduling, scoring across ranks, logging and state come from `ScheduledEval`.

A likelihood evaluator scores the model once before training (`at_fit_start`), optionally at validation
end and at train end, and whenever post hoc projection calls `evaluate(pl_module)` for a weight variant.
It remembers the metric of the start model and of the fully fine-tuned one, and adds to every later
result, per tracked metric, `<metric>_start`, `<metric>_full` and `<metric>_retention` with
R = (start − variant) / (start − full). Per-item values go to a W&B table and to
`<out_dir>/<prefix>_items.json` (`out_dir` defaults to the trainer's root folder, the run folder of a CLI
run), every evaluation in order: start, validations, then train end or the post hoc variants in the order
of PosthocProjection's rows. `safeproj report` pairs variants on these items for its effect sizes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from safeproj.callbacks._scheduled_eval import ScheduledEval, check_count
from safeproj.eval.stats import retention
from safeproj.io import plain_row, write_json


class LikelihoodEval(ScheduledEval):
    """Subclasses set `prefix`, `tracked` (metrics that get start/full/retention columns), and implement
    `_run` (score this rank's share: metrics, rows) and `_report` (bootstrap summary of all rows)."""

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
        super().__init__(every_n_val, at_validation, at_train_end, log_table, n_boot)
        self.num_samples, self.batch_size, self.max_length = num_samples, batch_size, max_length
        self.at_fit_start = bool(at_fit_start)
        self.out_dir = out_dir
        self.start_metrics: dict[str, float] = {}
        self.full_metrics: dict[str, float] = {}
        self.evaluations: list[dict] = []
        self._training = False  # between on_train_start and the full model's evaluation
        self._posthoc_scores_full = True

    # ---------------------------------------------------------------- work

    @override
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

    @override
    def _evaluate(self, pl_module: LightningModule, label: str) -> dict[str, float]:
        result, rows = self._score(pl_module)
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

    # ---------------------------------------------------------------- output

    @override
    def _rows_key(self) -> str:
        return f"{self.prefix}/{self.tracked[0]}_items"

    def _record(self, pl_module: LightningModule, label: str, result: dict[str, float], rows: list[dict]) -> None:
        trainer = pl_module._trainer  # None outside a Trainer
        step = int(trainer.global_step) if trainer is not None else None
        self.evaluations.append({"label": label, "step": step, "metrics": dict(result), "items": rows})
        out_dir = self.out_dir if self.out_dir is not None else getattr(trainer, "default_root_dir", None)
        if out_dir is None or (trainer is not None and not trainer.is_global_zero):
            return
        evaluations = [{**e, "metrics": plain_row(e["metrics"])} for e in self.evaluations]
        payload = {"evaluator": type(self).__name__, "prefix": self.prefix, "evaluations": evaluations}
        write_json(Path(out_dir) / f"{self.prefix}_items.json", payload, allow_nan=False)

    # ---------------------------------------------------------------- state

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "start_metrics": dict(self.start_metrics),
            "full_metrics": dict(self.full_metrics),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.start_metrics = dict(state_dict.get("start_metrics", {}))
        self.full_metrics = dict(state_dict.get("full_metrics", {}))
