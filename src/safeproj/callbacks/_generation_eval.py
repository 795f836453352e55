"""The shared base of the generation evaluation callbacks: every call to `evaluate` is the latest result.

Scheduling, scoring across ranks, logging and state come from `ScheduledEval`; a generation evaluator
keeps the metrics of its latest evaluation, from a hook or from post hoc projection, in `last_metrics`
and its per-sample rows in `last_rows` (the W&B table `<prefix>/samples`).
"""

from __future__ import annotations

from lightning.pytorch import LightningModule

from safeproj.callbacks._scheduled_eval import ScheduledEval


class GenerationEval(ScheduledEval):
    """Subclasses set `prefix` and implement `_run` (generate and score this rank's share) and `_report`
    (bootstrap summary of all rows)."""

    def _evaluate(self, pl_module: LightningModule, label: str) -> dict[str, float]:
        result, rows = self._score(pl_module)
        self.last_metrics, self.last_rows = result, rows
        return result
