"""AdvBench-style harm evaluation: harmful prompts, greedy responses, a judge, summed metrics."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torchmetrics import Metric

from safeproj.eval.generation import generate
from safeproj.eval.gsm8k import BUILTIN_PREFIX, builtin_split, read_records
from safeproj.eval.judges import Judge, Judgment, RefusalJudge, is_refusal

HF_ADVBENCH = "walledai/AdvBench"
PROMPT_FIELDS = ("prompt", "goal", "instruction")  # AdvBench on the hub, AdvBench csv, refusal_direction json


def load_harmful_prompts(source: str = HF_ADVBENCH, limit: int | None = None, seed: int = 0) -> list[str]:
    """Harmful instructions from "builtin:harmful-test"/"-train" (generated offline), a local
    .csv/.json/.jsonl with a `prompt`, `goal` or `instruction` field, or a Hugging Face dataset
    (`walledai/AdvBench`: column `prompt`, split train). `limit` keeps the first rows."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    if source.startswith(BUILTIN_PREFIX):
        if limit is None:
            raise ValueError(f"built-in set {source!r} is generated: give a number of samples")
        from safeproj.data import synthetic

        split = builtin_split(source, "harmful")
        return [row["prompt"] for row in synthetic.harmful_requests(limit, seed=seed, split=split)]
    if Path(source).exists():
        rows = read_records(source)
    elif source.count("/") == 1 and not source.startswith((".", "/", "~")):
        from datasets import load_dataset

        try:
            rows = list(load_dataset(source, split="train"))
        except Exception as err:  # datasets raises many types; one line naming the set is what helps
            raise ValueError(f"cannot load Hugging Face dataset {source!r}: {err}") from None
    else:
        raise ValueError(f"harm source {source!r} is not a built-in set, an existing file or a hub name 'org/name'")
    rows = rows[:limit] if limit else rows
    if not rows:
        raise ValueError(f"harm source {source!r} has no rows")
    field = next((f for f in PROMPT_FIELDS if f in rows[0]), None)
    if field is None:
        raise ValueError(f"{source}: rows need one of the fields {PROMPT_FIELDS}, found {sorted(rows[0])}")
    return [str(row[field]) for row in rows]


class HarmMetric(Metric):
    """Summed harm counts (exact under DDP): mean score and share of 5s over scored samples,
    refusal rate over samples with a refusal flag, unscored and parse-failure counts."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for name in ("n", "scored", "score_sum", "fives", "refusals", "refusal_known", "parse_failures"):
            self.add_state(name, torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, judgments: Sequence[Judgment], refusals: Sequence[bool | None]) -> None:
        if len(judgments) != len(refusals):
            raise ValueError(f"judgments and refusals differ in length: {len(judgments)} vs {len(refusals)}")
        for j, refused in zip(judgments, refusals):
            self.n += 1
            if j.scored:
                self.scored += 1
                self.score_sum += j.score
                self.fives += float(j.score == 5)
            self.parse_failures += float(j.failure == "parse")
            if refused is not None:
                self.refusal_known += 1
                self.refusals += float(refused)

    def compute(self) -> dict[str, torch.Tensor]:
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        return {
            "mean_score": self.score_sum / self.scored if self.scored > 0 else nan,
            "share_5": self.fives / self.scored if self.scored > 0 else nan,
            "refusal_rate": self.refusals / self.refusal_known if self.refusal_known > 0 else nan,
            "unscored": self.n - self.scored,
            "parse_failures": self.parse_failures,
            "n": self.n,
        }


def evaluate_harm(
    model,
    tokenizer,
    judge: Judge | None = None,
    dataset: str = "builtin:harmful-test",
    num_samples: int | None = 16,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> tuple[dict[str, float], list[dict]]:
    """Greedy responses to harmful prompts, judged: (metrics, this rank's per-sample rows).

    `judge` defaults to `RefusalJudge`. The refusal rate always comes from refusal-phrase matching
    of the response, so it is comparable across judges. With world_size > 1 each rank takes every
    world_size-th prompt and the summed metric states are synced.
    """
    from safeproj.data.templates import format_prompt

    judge = judge if judge is not None else RefusalJudge()
    prompts = load_harmful_prompts(dataset, limit=num_samples, seed=seed)[rank::world_size]
    formatted = [format_prompt(tokenizer, p) for p in prompts]
    responses = generate(model, tokenizer, formatted, max_new_tokens, batch_size, desc="harm", progress=progress)
    judgments = judge.judge(list(zip(prompts, responses)))
    if len(judgments) != len(prompts):
        raise ValueError(f"judge {judge!r} returned {len(judgments)} judgments for {len(prompts)} pairs")
    refusals = [is_refusal(r) or not r.strip() for r in responses]
    metric = HarmMetric(sync_on_compute=world_size > 1)
    metric.update(judgments, refusals)
    metrics = {k: float(v) for k, v in metric.compute().items()}
    rows = [
        {
            "prompt": p,
            "response": r,
            "score": j.score,
            "refusal": refused,
            "reason": j.reason,
            "failure": j.failure,
            "finish_reason": j.finish_reason,
            "cached": j.cached,
        }
        for p, r, j, refused in zip(prompts, responses, judgments, refusals)
    ]
    return metrics, rows
