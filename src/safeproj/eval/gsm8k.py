"""GSM8k utility: data, n-shot prompts, lm-eval-harness answer extraction and accuracy.

Extraction follows lm-evaluation-harness's `gsm8k` task (lm_eval/tasks/gsm8k/gsm8k.yaml):
- strict: the first number after "#### " (regex `#### (\\-?[0-9\\.\\,]+)`);
- flexible: the last match of `(-?[$0-9.,]{2,})|(-?[0-9]+)` anywhere in the output.

Two protocols:
- `chat` (the default, for chat models and the built-in CPU data): the chat template, exemplars as earlier
  turns, and numeric comparison: both sides normalised (commas, "$" and one trailing "." removed) and
  compared as numbers, so "1,000" equals "1000" and "3.0" equals "3".
- `lm-eval`: lm-eval's `gsm8k` task as it is: plain "Question: ...\nAnswer:" text, no chat template,
  n-shot exemplars drawn as lm-eval draws them (one `random.Random(1234).sample` of the train split per
  test item, in order) and joined by blank lines, generation cut at "Question:", "</s>" and "<|im_end|>",
  and comparison as strings after lm-eval's exact_match normalisation (`normalize_lm_eval`): "#### 5.00"
  against gold 5 is wrong, "The answer is 5." is right under flexible extraction.
Either protocol takes `comparison` ("numeric" or "string") to override its own.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation

import torch
from torchmetrics import Metric

from safeproj.data.records import complete_rows, is_local, load_records
from safeproj.data.synthetic import BUILTIN_PREFIX, builtin_split
from safeproj.data.templates import format_prompt
from safeproj.eval.generation import generate

STRICT_PATTERN = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE_PATTERN = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
HF_GSM8K = "openai/gsm8k"
FIELDS = ("question", "answer")  # GSM8k's own; the built-in set calls the question "prompt"
PROTOCOLS = ("chat", "lm-eval")
COMPARISONS = ("numeric", "string")
# lm-eval gsm8k.yaml: metric exact_match with these regexes_to_ignore (applied in order to both sides),
# ignore_case true, ignore_punctuation false; generation_kwargs.until; the default fewshot_random_seed.
LM_EVAL_REGEXES_TO_IGNORE = (",", r"\$", r"(?s).*#### ", r"\.$")
LM_EVAL_STOP = ("Question:", "</s>", "<|im_end|>")
LM_EVAL_FEWSHOT_SEED = 1234
BUILTIN_FEWSHOT_POOL = 256  # generated training problems exemplars are drawn from under `lm-eval`


# ---------------------------------------------------------------- extraction and comparison


def extract_strict(text: str) -> str | None:
    """The number after the first "#### ", or None."""
    match = STRICT_PATTERN.search(text)
    return match.group(1) if match else None


def extract_flexible(text: str) -> str | None:
    """The last number-like span in the text (lm-eval's flexible-extract), or None."""
    matches = FLEXIBLE_PATTERN.findall(text)
    if not matches:
        return None
    groups = [g for g in matches[-1] if g]
    return groups[0] if groups else None


def normalize_number(text: str) -> str:
    """Strip what lm-eval ignores: commas, dollar signs, one trailing period, surrounding space."""
    text = text.strip().replace(",", "").replace("$", "")
    return text[:-1] if text.endswith(".") else text


def numbers_equal(predicted: str | None, gold: str) -> bool:
    """Numeric equality after normalisation; non-numbers fall back to exact string equality."""
    if predicted is None:
        return False
    a, b = normalize_number(predicted), normalize_number(gold)
    try:
        return Decimal(a) == Decimal(b)
    except InvalidOperation:
        return a != "" and a.lower() == b.lower()


def normalize_lm_eval(text: str) -> str:
    """lm-eval's exact_match normalisation for gsm8k: drop ",", "$", everything up to the last "#### " and one
    trailing ".", then lower-case."""
    for pattern in LM_EVAL_REGEXES_TO_IGNORE:
        text = re.sub(pattern, "", text)
    return text.lower()


def strings_equal(predicted: str | None, reference: str) -> bool:
    """lm-eval's comparison: equal strings after `normalize_lm_eval` (no answer found is always wrong)."""
    return predicted is not None and normalize_lm_eval(predicted) == normalize_lm_eval(reference)


def gold_answer(solution: str) -> str:
    """The gold number of a GSM8k worked solution ("... #### 72" -> "72"); plain numbers pass through."""
    if "####" in solution:
        return normalize_number(solution.split("####")[-1])
    return normalize_number(solution)


def score_output(output: str, gold: str, comparison: str = "numeric") -> dict:
    """Both extractions of one model output and whether each matches the gold: a number compared as a number
    (`numeric`), or the reference answer compared as lm-eval compares strings (`string`)."""
    if comparison not in COMPARISONS:
        raise ValueError(f"comparison must be one of {', '.join(COMPARISONS)}, got {comparison!r}")
    equal = numbers_equal if comparison == "numeric" else strings_equal
    strict, flexible = extract_strict(output), extract_flexible(output)
    return {
        "strict": strict,
        "flexible": flexible,
        "strict_correct": equal(strict, gold),
        "flexible_correct": equal(flexible, gold),
    }


class GSM8kAccuracy(Metric):
    """Strict and flexible exact-match accuracy; summed counts, so it syncs exactly across ranks."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, comparison: str = "numeric", **kwargs):
        super().__init__(**kwargs)
        if comparison not in COMPARISONS:
            raise ValueError(f"comparison must be one of {', '.join(COMPARISONS)}, got {comparison!r}")
        self.comparison = comparison
        self.add_state("strict_correct", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("flexible_correct", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, outputs: Sequence[str], golds: Sequence[str]) -> None:
        if len(outputs) != len(golds):
            raise ValueError(f"outputs and golds differ in length: {len(outputs)} vs {len(golds)}")
        for output, gold in zip(outputs, golds):
            scored = score_output(output, gold, self.comparison)
            self.strict_correct += int(scored["strict_correct"])
            self.flexible_correct += int(scored["flexible_correct"])
        self.total += len(outputs)

    def compute(self) -> dict[str, torch.Tensor]:
        n = self.total.clamp(min=1).double()
        return {
            "strict_acc": self.strict_correct.double() / n,
            "flexible_acc": self.flexible_correct.double() / n,
            "n": self.total.double(),
        }


# ---------------------------------------------------------------- data


def load_gsm8k(source: str = HF_GSM8K, split: str = "test", limit: int | None = None, seed: int = 0) -> list[dict]:
    """Math problems as dicts with "question", "solution" (worked answer), "gold" (a number) and "reference"
    (the answer field as written, which lm-eval compares against).

    `source` is "builtin:useful-test" / "builtin:useful-train" (generated offline, `seed` picks
    the problems), a local .jsonl/.json/.csv with GSM8k's `question` and `answer` fields, or a
    Hugging Face dataset name (`openai/gsm8k` uses config "main"). `limit` keeps the first rows;
    rows with an empty question or answer are dropped and reported.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    builtin = source.startswith(BUILTIN_PREFIX)
    if builtin:
        if limit is None:
            raise ValueError(f"built-in set {source!r} is generated: give a number of samples")
        builtin_split(source, "useful")
    records = load_records(source, split=split, n=limit, seed=seed)
    question, answer = ("prompt", "answer") if builtin else FIELDS
    missing = [f for f in (question, answer) if f not in records.columns]
    if missing and len(records):
        raise ValueError(
            f"{source}: no field(s) {missing}; GSM8k rows need 'question' and 'answer', "
            f"the columns are {', '.join(records.columns)}"
        )
    records = complete_rows(records, [question, answer], limit=limit)
    # The built-in set keeps its worked solution in "response" and the "#### N" line in "answer".
    solution = "response" if builtin else answer
    return [
        {
            "question": r[question],
            "solution": r.get(solution) or r[answer],
            "gold": _gold(records, i, str(r[answer])),
            "reference": str(r[answer]),
        }
        for i, r in enumerate(records.rows())
    ]


def _gold(records, i: int, answer: str) -> str:
    """The gold number of row i; a ValueError naming file and line when it has none (it could never be scored)."""
    gold = gold_answer(answer)
    try:
        Decimal(gold)
    except InvalidOperation:
        raise ValueError(
            f"{records.where(i)}: no gold number in answer {answer[-40:]!r}: end it with '#### <number>'"
        ) from None
    return gold


def _fewshot_source(source: str, n_shot: int, fewshot_source: str | None) -> str:
    """Where exemplars come from: `fewshot_source`, else the train split of `source`."""
    if fewshot_source is not None:
        return fewshot_source
    if source.startswith(BUILTIN_PREFIX):
        return f"{BUILTIN_PREFIX}useful-train"
    if not is_local(source):
        return source  # a hub name: its train split
    raise ValueError(f"n_shot={n_shot} with local file {source!r}: give fewshot_source (a train set)")


def fewshot_exemplars(source: str, n_shot: int, seed: int = 0, fewshot_source: str | None = None) -> list[dict]:
    """`n_shot` fixed exemplars for `source`: its train split unless `fewshot_source` names one."""
    if n_shot == 0:
        return []
    fewshot_source = _fewshot_source(source, n_shot, fewshot_source)
    if fewshot_source.startswith(BUILTIN_PREFIX):
        return load_gsm8k(fewshot_source, limit=n_shot, seed=seed + 1)
    pool = load_gsm8k(fewshot_source, split="train")
    if len(pool) < n_shot:
        raise ValueError(f"fewshot_source {fewshot_source!r} has {len(pool)} rows, fewer than n_shot={n_shot}")
    return random.Random(seed).sample(pool, n_shot)


def build_prompts(tokenizer, questions: Sequence[str], exemplars: Sequence[dict] = ()) -> list[str]:
    """Chat prompts ending in the assistant turn; exemplars become earlier user/assistant turns."""
    history = [(ex["question"], ex["solution"]) for ex in exemplars]
    return [format_prompt(tokenizer, q, history) for q in questions]


def lm_eval_exemplars(
    pool: Sequence[dict], n_items: int, n_shot: int, seed: int = LM_EVAL_FEWSHOT_SEED
) -> list[list[dict]]:
    """Exemplars of each of `n_items` test items as lm-eval's default ContextSampler draws them: one generator
    seeded once, `sample(pool, n_shot)` per item, in item order (so items get different exemplars)."""
    if n_shot == 0:
        return [[] for _ in range(n_items)]
    if len(pool) < n_shot:
        raise ValueError(f"the few-shot pool has {len(pool)} rows, fewer than n_shot={n_shot}")
    rng = random.Random(seed)
    return [[pool[i] for i in rng.sample(range(len(pool)), n_shot)] for _ in range(n_items)]


def lm_eval_prompt(question: str, exemplars: Sequence[dict] = ()) -> str:
    """lm-eval's gsm8k context: each exemplar as "Question: q\nAnswer: a" and a blank line, then the item's
    "Question: q\nAnswer:" (doc_to_text, target_delimiter " ", fewshot_delimiter "\n\n"; no chat template)."""
    shots = "".join(f"Question: {ex['question']}\nAnswer: {ex['solution']}\n\n" for ex in exemplars)
    return f"{shots}Question: {question}\nAnswer:"


# ---------------------------------------------------------------- evaluation


def evaluate_gsm8k(
    model,
    tokenizer,
    dataset: str = "builtin:useful-test",
    num_samples: int | None = 16,
    n_shot: int = 0,
    fewshot_source: str | None = None,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    stop: Sequence[str] | None = None,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    protocol: str = "chat",
    comparison: str | None = None,
) -> tuple[dict[str, float], list[dict]]:
    """Greedy GSM8k accuracy: (metrics, this rank's per-sample rows).

    `protocol` is "chat" or "lm-eval" (see the module docstring); `comparison` ("numeric" or "string")
    overrides the protocol's own (numeric for chat, string for lm-eval). With world_size > 1 each rank takes
    every world_size-th problem and the metric's summed states are synced, so every rank returns the global
    metrics; rows stay local.
    """
    if n_shot < 0:
        raise ValueError(f"n_shot must be >= 0, got {n_shot}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    comparison = comparison or ("string" if protocol == "lm-eval" else "numeric")
    problems = load_gsm8k(dataset, split="test", limit=num_samples, seed=seed)
    if protocol == "lm-eval":
        # Exemplars are drawn for every item before the items are shared out, so ranks agree with one process.
        pool = _fewshot_pool(dataset, n_shot, seed, fewshot_source)
        shots = lm_eval_exemplars(pool, len(problems), n_shot)[rank::world_size]
        mine = problems[rank::world_size]
        prompts = [lm_eval_prompt(p["question"], ex) for p, ex in zip(mine, shots)]
        stop = [*LM_EVAL_STOP, *(s for s in stop or () if s not in LM_EVAL_STOP)]
    else:
        exemplars = fewshot_exemplars(dataset, n_shot, seed=seed, fewshot_source=fewshot_source)
        mine = problems[rank::world_size]
        prompts = build_prompts(tokenizer, [p["question"] for p in mine], exemplars)
    outputs = generate(
        model, tokenizer, prompts, max_new_tokens, batch_size, stop=stop, desc="gsm8k", progress=progress
    )
    golds = [p["reference"] if comparison == "string" else p["gold"] for p in mine]
    metric = GSM8kAccuracy(comparison=comparison, sync_on_compute=world_size > 1)
    metric.update(outputs, golds)
    metrics = {k: float(v) for k, v in metric.compute().items()}
    rows = [
        {"question": p["question"], "output": out, "gold": p["gold"], **score_output(out, gold, comparison)}
        for p, out, gold in zip(mine, outputs, golds)
    ]
    return metrics, rows


def _fewshot_pool(source: str, n_shot: int, seed: int, fewshot_source: str | None) -> list[dict]:
    """The rows lm-eval mode draws exemplars from, in order: the train split (all of it), or for the built-in
    set BUILTIN_FEWSHOT_POOL generated training problems."""
    if n_shot == 0:
        return []
    fewshot_source = _fewshot_source(source, n_shot, fewshot_source)
    if fewshot_source.startswith(BUILTIN_PREFIX):
        return load_gsm8k(fewshot_source, limit=max(BUILTIN_FEWSHOT_POOL, n_shot), seed=seed + 1)
    return load_gsm8k(fewshot_source, split="train")
