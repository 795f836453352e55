"""Utility as a continuous callback metric: teacher-forced NLL of gold worked answers, under `utility/`."""

from __future__ import annotations

from typing_extensions import override

from safeproj.callbacks._likelihood_eval import LikelihoodEval
from safeproj.callbacks._scheduled_eval import check_dataset
from safeproj.eval.likelihood import DEFAULT_MAX_LENGTH
from safeproj.eval.metrics import evaluate_answer_nll
from safeproj.eval.stats import mean_with_ci


class UtilityLikelihoodEval(LikelihoodEval):
    """Answer NLL: mean over held-out problems of the mean per-token NLL of the gold worked answer.

    Logs `utility/answer_nll` (lower is better), `n` and `n_tokens`, and the bootstrap interval over problems
    in the table `utility/intervals`; once the start (before training) and full (trained) values are known, also
    `answer_nll_start`, `answer_nll_full` and `answer_nll_retention` = (start − value) / (start − full).
    Exact-match accuracy stays with `UtilityEval` as a spot check.

    Args:
        dataset: "builtin:useful-test" (offline), a local GSM8k .jsonl, or a hub name ("openai/gsm8k").
        num_samples: problems scored (the first ones of the set).
        batch_size: sequences per forward pass.
        max_length: tokens per question + answer; longer answers lose their end, as in training.
        every_n_val: evaluate on every n-th validation (when `at_validation`).
        at_validation: evaluate at validation epoch end (sanity checks excluded).
        at_train_end: evaluate once training ends.
        at_fit_start: score the start model once, the reference for retention.
        seed: picks the built-in problems.
        log_table: log per-problem rows to W&B when a WandbLogger is attached.
        out_dir: where every evaluation's per-problem values go (`utility_items.json`); default the
            trainer's root folder.
        n_boot: bootstrap resamples for the 95 % interval.

    Raises:
        MisconfigurationException: a count below its minimum or an unknown built-in set.
    """

    prefix = "utility"
    tracked = ("answer_nll",)

    def __init__(
        self,
        dataset: str = "builtin:useful-test",
        num_samples: int = 64,
        batch_size: int = 8,
        max_length: int = DEFAULT_MAX_LENGTH,
        every_n_val: int = 1,
        at_validation: bool = False,
        at_train_end: bool = True,
        at_fit_start: bool = True,
        seed: int = 0,
        log_table: bool = True,
        out_dir: str | None = None,
        n_boot: int = 1000,
    ):
        super().__init__(
            num_samples, batch_size, max_length, every_n_val, at_validation, at_train_end, at_fit_start,
            log_table, out_dir, n_boot,
        )  # fmt: skip
        check_dataset(dataset, "useful")
        self.dataset = dataset
        self.seed = seed

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(dataset=self.dataset, num_samples=self.num_samples, metric="answer_nll")

    def _run(self, model, tokenizer, rank, world_size):
        return evaluate_answer_nll(
            model,
            tokenizer,
            **self._share(rank, world_size),
            max_length=self.max_length,
        )

    def _report(self, rows):
        return mean_with_ci([r["answer_nll"] for r in rows], "answer_nll", self.n_boot, self.seed)
