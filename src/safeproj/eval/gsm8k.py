"""GSM8k utility: data, n-shot chat prompts, lm-eval-harness answer extraction and accuracy.

Extraction follows lm-evaluation-harness's `gsm8k` task:
- strict: the first number after "#### " (regex `#### (\\-?[0-9\\.\\,]+)`);
- flexible: the last match of `(-?[$0-9.,]{2,})|(-?[0-9]+)` anywhere in the output.
Both sides are normalised (commas, "$" and one trailing "." removed) and compared as numbers, so
"1,000" equals "1000" and "3.0" equals "3".
"""

from __future__ import annotations

import csv
import json
import random
import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path

import torch
from torchmetrics import Metric

from safeproj.eval.generation import generate

STRICT_PATTERN = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE_PATTERN = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
HF_GSM8K = "openai/gsm8k"
BUILTIN_PREFIX = "builtin:"
BUILTIN_SPLITS = ("train", "test")


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


def gold_answer(solution: str) -> str:
    """The gold number of a GSM8k worked solution ("... #### 72" -> "72"); plain numbers pass through."""
    if "####" in solution:
        return normalize_number(solution.split("####")[-1])
    return normalize_number(solution)


def score_output(output: str, gold: str) -> dict:
    """Both extractions of one model output and whether each matches the gold number."""
    strict, flexible = extract_strict(output), extract_flexible(output)
    return {
        "strict": strict,
        "flexible": flexible,
        "strict_correct": numbers_equal(strict, gold),
        "flexible_correct": numbers_equal(flexible, gold),
    }


class GSM8kAccuracy(Metric):
    """Strict and flexible exact-match accuracy; summed counts, so it syncs exactly across ranks."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("strict_correct", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("flexible_correct", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, outputs: Sequence[str], golds: Sequence[str]) -> None:
        if len(outputs) != len(golds):
            raise ValueError(f"outputs and golds differ in length: {len(outputs)} vs {len(golds)}")
        for output, gold in zip(outputs, golds):
            scored = score_output(output, gold)
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


def read_records(path: str | Path) -> list[dict]:
    """Rows of a local .jsonl, .json (a list of objects) or .csv file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    if suffix == ".json":
        rows = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a JSON list of objects")
        return rows
    if suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))
    raise ValueError(f"{path}: unsupported file type {suffix!r} (use .jsonl, .json or .csv)")


def builtin_split(source: str, kind: str) -> str:
    """The split named by "builtin:<kind>-<split>", checked."""
    name = source[len(BUILTIN_PREFIX) :]
    allowed = [f"{BUILTIN_PREFIX}{kind}-{s}" for s in BUILTIN_SPLITS]
    if not name.startswith(f"{kind}-") or name[len(kind) + 1 :] not in BUILTIN_SPLITS:
        raise ValueError(f"unknown built-in set {source!r}; expected one of {', '.join(allowed)}")
    return name[len(kind) + 1 :]


def _builtin_problems(split: str, n: int, seed: int) -> list[dict]:
    from safeproj.data import synthetic

    problems = []
    for row in synthetic.arithmetic(n, seed=seed, split=split):
        solution = row.get("response") or row["answer"]
        problems.append({"question": row["prompt"], "solution": solution, "gold": gold_answer(row["answer"])})
    return problems


def _hf_rows(name: str, split: str) -> list[dict]:
    from datasets import load_dataset

    config = "main" if name == HF_GSM8K else None
    try:
        return list(load_dataset(name, config, split=split))
    except Exception as err:  # datasets raises many types; one line naming the set is what helps
        raise ValueError(f"cannot load Hugging Face dataset {name!r} split {split!r}: {err}") from None


def load_gsm8k(source: str = HF_GSM8K, split: str = "test", limit: int | None = None, seed: int = 0) -> list[dict]:
    """Math problems as dicts with "question", "solution" (worked answer) and "gold" (a number).

    `source` is "builtin:useful-test" / "builtin:useful-train" (generated offline, `seed` picks
    the problems), a local .jsonl/.json/.csv with GSM8k's `question` and `answer` fields, or a
    Hugging Face dataset name (`openai/gsm8k` uses config "main"). `limit` keeps the first rows.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    if source.startswith(BUILTIN_PREFIX):
        if limit is None:
            raise ValueError(f"built-in set {source!r} is generated: give a number of samples")
        return _builtin_problems(builtin_split(source, "useful"), limit, seed)
    if Path(source).exists():
        rows = read_records(source)
    elif source.count("/") == 1 and not source.startswith((".", "/", "~")):
        rows = _hf_rows(source, split)
    else:
        raise ValueError(f"GSM8k source {source!r} is not a built-in set, an existing file or a hub name 'org/name'")
    rows = rows[:limit] if limit else rows
    for i, row in enumerate(rows):
        missing = [k for k in ("question", "answer") if k not in row]
        if missing:
            raise ValueError(f"{source}: row {i} lacks field(s) {missing}; GSM8k rows need 'question' and 'answer'")
    return [{"question": r["question"], "solution": r["answer"], "gold": gold_answer(str(r["answer"]))} for r in rows]


def fewshot_exemplars(source: str, n_shot: int, seed: int = 0, fewshot_source: str | None = None) -> list[dict]:
    """`n_shot` fixed exemplars for `source`: its train split unless `fewshot_source` names one."""
    if n_shot == 0:
        return []
    if fewshot_source is None:
        if source.startswith(BUILTIN_PREFIX):
            fewshot_source = f"{BUILTIN_PREFIX}useful-train"
        elif not Path(source).exists():
            fewshot_source = source  # a hub name: its train split
        else:
            raise ValueError(f"n_shot={n_shot} with local file {source!r}: give fewshot_source (a train set)")
    if fewshot_source.startswith(BUILTIN_PREFIX):
        return load_gsm8k(fewshot_source, limit=n_shot, seed=seed + 1)
    pool = load_gsm8k(fewshot_source, split="train")
    if len(pool) < n_shot:
        raise ValueError(f"fewshot_source {fewshot_source!r} has {len(pool)} rows, fewer than n_shot={n_shot}")
    return random.Random(seed).sample(pool, n_shot)


def build_prompts(tokenizer, questions: Sequence[str], exemplars: Sequence[dict] = ()) -> list[str]:
    """Chat prompts ending in the assistant turn; exemplars become earlier user/assistant turns."""
    if not exemplars:
        from safeproj.data.templates import format_prompt

        return [format_prompt(tokenizer, q) for q in questions]
    from safeproj.data.templates import CHAT_TEMPLATE

    # Same template choice as format_prompt, so 0-shot and n-shot prompts differ only in the turns.
    template = None if getattr(tokenizer, "chat_template", None) else CHAT_TEMPLATE
    turns = []
    for ex in exemplars:
        turns += [{"role": "user", "content": ex["question"]}, {"role": "assistant", "content": ex["solution"]}]
    return [
        tokenizer.apply_chat_template(
            turns + [{"role": "user", "content": q}], chat_template=template, tokenize=False, add_generation_prompt=True
        )
        for q in questions
    ]


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
) -> tuple[dict[str, float], list[dict]]:
    """Greedy GSM8k accuracy: (metrics, this rank's per-sample rows).

    With world_size > 1 each rank takes every world_size-th problem and the metric's summed
    states are synced, so every rank returns the global metrics; rows stay local.
    """
    if n_shot < 0:
        raise ValueError(f"n_shot must be >= 0, got {n_shot}")
    problems = load_gsm8k(dataset, split="test", limit=num_samples, seed=seed)
    exemplars = fewshot_exemplars(dataset, n_shot, seed=seed, fewshot_source=fewshot_source)
    mine = problems[rank::world_size]
    prompts = build_prompts(tokenizer, [p["question"] for p in mine], exemplars)
    outputs = generate(
        model, tokenizer, prompts, max_new_tokens, batch_size, stop=stop, desc="gsm8k", progress=progress
    )
    metric = GSM8kAccuracy(sync_on_compute=world_size > 1)
    metric.update(outputs, [p["gold"] for p in mine])
    metrics = {k: float(v) for k, v in metric.compute().items()}
    rows = [
        {"question": p["question"], "output": out, "gold": p["gold"], **score_output(out, p["gold"])}
        for p, out in zip(mine, outputs)
    ]
    return metrics, rows
