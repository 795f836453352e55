"""Harm as a continuous callback metric: the comply-minus-refuse likelihood margin, under `harm/`."""

from __future__ import annotations

from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from safeproj.callbacks._likelihood_eval import LikelihoodEval
from safeproj.callbacks._scheduled_eval import check_dataset
from safeproj.eval.likelihood import DEFAULT_MAX_LENGTH
from safeproj.eval.metrics import DEFAULT_REFUSAL, evaluate_comply_margin
from safeproj.eval.stats import mean_with_ci


class HarmLikelihoodEval(LikelihoodEval):
    """Comply margin: per held-out harmful prompt, mean per-token log p(comply) − log p(refuse).

    Logs `harm/comply_margin` (mean margin; positive = the model prefers to comply) and
    `harm/comply_preference` (share of prompts with margin > 0), each with a bootstrap interval over
    prompts in the table `harm/intervals`, and `n`; once the start and full values are known, `<metric>_start`, `<metric>_full` and
    `<metric>_retention` for both. A monotone proxy of how likely greedy decoding is to start complying,
    not a refusal rate or a judge score (see `safeproj.eval.metrics`).

    Args:
        dataset: "builtin:harmful-test" (offline: generated complying and refusing answers to the same
            prompts), a local file or a hub name with prompts and complying responses ("walledai/AdvBench").
        num_samples: prompts scored (a seeded draw; the first ones of a built-in set).
        comply_field: column of the complying response (default: response|output|answer|target).
        refuse_field: column of the refusing response; without one every prompt gets `refusal`.
        refusal: the refusing continuation where the data has none.
        batch_size, max_length, every_n_val, at_validation, at_train_end, at_fit_start, seed, log_table,
            n_boot: as for `UtilityLikelihoodEval`.
        out_dir: where every evaluation's per-prompt values go (`harm_items.json`); default the
            trainer's root folder.

    Raises:
        MisconfigurationException: a count below its minimum, an unknown built-in set or an empty refusal.
    """

    prefix = "harm"
    tracked = ("comply_margin", "comply_preference")

    def __init__(
        self,
        dataset: str = "builtin:harmful-test",
        num_samples: int = 64,
        comply_field: str | None = None,
        refuse_field: str | None = None,
        refusal: str = DEFAULT_REFUSAL,
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
        check_dataset(dataset, "harmful")
        if not isinstance(refusal, str) or not refusal.strip():
            raise MisconfigurationException(f"`refusal` must be a non-empty string, got {refusal!r}")
        self.dataset = dataset
        self.comply_field, self.refuse_field, self.refusal = comply_field, refuse_field, refusal
        self.seed = seed

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(dataset=self.dataset, num_samples=self.num_samples, metric="comply_margin")

    def _run(self, model, tokenizer, rank, world_size):
        return evaluate_comply_margin(
            model,
            tokenizer,
            **self._share(rank, world_size),
            max_length=self.max_length,
            comply_field=self.comply_field,
            refuse_field=self.refuse_field,
            refusal=self.refusal,
        )

    def _report(self, rows):
        margins = [r["comply_margin"] for r in rows]
        out = mean_with_ci(margins, "comply_margin", self.n_boot, self.seed)
        out.update(mean_with_ci([float(m > 0) for m in margins], "comply_preference", self.n_boot, self.seed))
        return out
