"""Harm as a callback: greedy responses to AdvBench-style prompts, scored by a judge, under `harm/`."""

from __future__ import annotations

from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from safeproj.callbacks._generation_eval import GenerationEval
from safeproj.callbacks._scheduled_eval import check_count, check_dataset
from safeproj.eval.harm import evaluate_harm
from safeproj.eval.judges import Judge, RefusalJudge
from safeproj.eval.stats import harm_report


class HarmEval(GenerationEval):
    """AdvBench-style harm: greedy responses to harmful prompts, scored by a judge.

    Args:
        dataset: "builtin:harmful-test" (offline), a local AdvBench .csv (`goal`), or a hub name
            ("walledai/AdvBench").
        num_samples: prompts evaluated (the first ones of the set).
        max_new_tokens: generation budget per response (the paper uses 512).
        batch_size: prompts per generation batch.
        judge: scores (prompt, response) pairs; default `RefusalJudge` (offline proxy). In YAML an
            `OpenAIJudge` is given as class_path/init_args; its key stays in the environment.
        every_n_val, at_validation, at_train_end, seed, log_table, n_boot: as for `UtilityEval`.
        chat_template: prompts through the model's chat template (default); False feeds them as raw text,
            as the paper does for AdvBench.

    Raises:
        MisconfigurationException: a count below its minimum, an unknown built-in set, or a judge
            without a `judge(pairs)` method.
    """

    prefix = "harm"

    def __init__(
        self,
        dataset: str = "builtin:harmful-test",
        num_samples: int = 16,
        max_new_tokens: int = 64,
        batch_size: int = 8,
        judge: Judge | None = None,
        every_n_val: int = 1,
        at_validation: bool = False,
        at_train_end: bool = True,
        seed: int = 0,
        log_table: bool = True,
        n_boot: int = 1000,
        chat_template: bool = True,
    ):
        super().__init__(every_n_val, at_validation, at_train_end, log_table, n_boot)
        check_dataset(dataset, "harmful")
        check_count("num_samples", num_samples)
        check_count("max_new_tokens", max_new_tokens)
        check_count("batch_size", batch_size)
        if judge is not None and not isinstance(judge, Judge):
            raise MisconfigurationException(f"`judge` must have a judge(pairs) method, got {type(judge).__name__}")
        self.dataset = dataset
        self.num_samples = num_samples
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.judge = judge if judge is not None else RefusalJudge()
        self.seed = seed
        self.chat_template = bool(chat_template)

    @property
    @override
    def state_key(self) -> str:
        # Raw prompts only named when set, so checkpoints of templated runs keep their key.
        raw = {} if self.chat_template else {"chat_template": False}
        return self._generate_state_key(
            dataset=self.dataset, num_samples=self.num_samples, judge=repr(self.judge), **raw
        )

    def _run(self, model, tokenizer, rank, world_size):
        return evaluate_harm(
            model,
            tokenizer,
            **self._share(rank, world_size),
            judge=self.judge,
            max_new_tokens=self.max_new_tokens,
            chat_template=self.chat_template,
        )

    def _report(self, rows):
        return harm_report(rows, n_boot=self.n_boot, seed=self.seed)
