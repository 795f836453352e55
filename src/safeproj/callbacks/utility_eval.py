"""Utility as a callback: greedy GSM8k-style answers, strict and flexible exact match, under `utility/`."""

from __future__ import annotations

from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from safeproj.callbacks._generation_eval import GenerationEval
from safeproj.callbacks._scheduled_eval import check_count, check_dataset
from safeproj.eval.gsm8k import COMPARISONS, PROTOCOLS, evaluate_gsm8k
from safeproj.eval.stats import utility_report


class UtilityEval(GenerationEval):
    """GSM8k-style utility: greedy answers to math problems, strict and flexible exact match.

    Args:
        dataset: "builtin:useful-test" (offline), a local GSM8k .jsonl, or a hub name ("openai/gsm8k").
        num_samples: problems evaluated (the first ones of the set).
        n_shot: worked exemplars placed as earlier chat turns (0 for chat models).
        fewshot_source: where exemplars come from; default the set's train split.
        max_new_tokens: generation budget per answer.
        batch_size: prompts per generation batch.
        stop: extra stop strings besides eos.
        every_n_val: evaluate on every n-th validation (when `at_validation`).
        at_validation: evaluate at validation epoch end (sanity checks excluded).
        at_train_end: evaluate once training ends.
        seed: picks the built-in problems and the exemplars.
        log_table: log per-sample rows to W&B when a WandbLogger is attached.
        n_boot: bootstrap resamples for the 95 % intervals.
        protocol: "chat" (chat template, numeric comparison) or "lm-eval" (lm-eval-harness's gsm8k task: plain
            Question/Answer text, its exemplar draw and stop strings, string comparison).
        comparison: "numeric" or "string" to override the protocol's own comparison.

    Raises:
        MisconfigurationException: a count below its minimum or an unknown built-in set.
    """

    prefix = "utility"

    def __init__(
        self,
        dataset: str = "builtin:useful-test",
        num_samples: int = 16,
        n_shot: int = 0,
        fewshot_source: str | None = None,
        max_new_tokens: int = 128,
        batch_size: int = 8,
        stop: list[str] | None = None,
        every_n_val: int = 1,
        at_validation: bool = False,
        at_train_end: bool = True,
        seed: int = 0,
        log_table: bool = True,
        n_boot: int = 1000,
        protocol: str = "chat",
        comparison: str | None = None,
    ):
        super().__init__(every_n_val, at_validation, at_train_end, log_table, n_boot)
        check_dataset(dataset, "useful")
        check_count("num_samples", num_samples)
        check_count("n_shot", n_shot, minimum=0)
        check_count("max_new_tokens", max_new_tokens)
        check_count("batch_size", batch_size)
        if protocol not in PROTOCOLS or comparison not in (None, *COMPARISONS):
            raise MisconfigurationException(
                f"`protocol` must be one of {', '.join(PROTOCOLS)} and `comparison` one of {', '.join(COMPARISONS)} "
                f"or None, got protocol={protocol!r}, comparison={comparison!r}"
            )
        if stop is not None and not all(isinstance(s, str) and s for s in stop):
            raise MisconfigurationException(f"`stop` must be a list of non-empty strings, got {stop!r}")
        self.dataset = dataset
        self.num_samples = num_samples
        self.n_shot = n_shot
        self.fewshot_source = fewshot_source
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.stop = list(stop) if stop else None
        self.seed = seed
        self.protocol = protocol
        self.comparison = comparison

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(dataset=self.dataset, num_samples=self.num_samples, n_shot=self.n_shot)

    def _run(self, model, tokenizer, rank, world_size):
        return evaluate_gsm8k(
            model,
            tokenizer,
            **self._share(rank, world_size),
            n_shot=self.n_shot,
            fewshot_source=self.fewshot_source,
            max_new_tokens=self.max_new_tokens,
            stop=self.stop,
            protocol=self.protocol,
            comparison=self.comparison,
        )

    def _report(self, rows):
        return utility_report(rows, n_boot=self.n_boot, seed=self.seed)
