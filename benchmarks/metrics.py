"""Continuous metrics vs generation-based scores on SmolLM2-135M: cost per item and signal-to-noise.

Cost: seconds per item of `utility/answer_nll` and `harm/comply_margin` (forward passes only) beside
`UtilityEval` / `HarmEval` with the settings of recipes/useful.yaml (greedy generation, 128 and 64 new
tokens, batch 8; harm judged by the keyword refusal proxy, reported as `nonrefusal_rate_keyword`).

Signal: each metric before and after a short fine-tune from the same start weights, on the same items:
  useful   --steps AdamW steps on builtin:useful (lr --lr, batch --batch-size)  -> answer NLL change
  harmful  --steps AdamW steps on builtin:harmful                               -> comply margin change
z = mean paired difference / (SD / sqrt(n)); target |z| >= 10 for both. `--cross` also scores the other
continuous metric after each fine-tune; `--generation-signal` also scores the generation-based metric
before and after (exact match after the useful fine-tune, keyword non-refusal after the harmful one).

One torch thread by default: on a shared 2-core machine two OpenMP threads ran a forward pass 2x slower.

    python benchmarks/metrics.py [--n 64] [--steps 10] [--gen-samples 8] [--threads 1] [--out PATH]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from safeproj.data.sources import SourceSpec, load_pairs
from safeproj.data.templates import format_example, pad_batch
from safeproj.eval.gsm8k import evaluate_gsm8k
from safeproj.eval.harm import evaluate_harm
from safeproj.eval.metrics import evaluate_answer_nll, evaluate_comply_margin
from safeproj.io import write_json
from safeproj.model.loading import load_model

# UtilityEval / HarmEval settings of recipes/useful.yaml.
UTILITY_MAX_NEW_TOKENS, HARM_MAX_NEW_TOKENS, GENERATION_BATCH = 128, 64, 8


def paired_z(before: list[float], after: list[float]) -> dict:
    """Mean paired change, its SD, n, and z = mean / (SD / sqrt(n)) (inf when every item moved alike)."""
    d = torch.tensor(after, dtype=torch.float64) - torch.tensor(before, dtype=torch.float64)
    n, mean = d.numel(), d.mean().item()
    sd = d.std().item() if n > 1 else math.nan
    z = mean / (sd / math.sqrt(n)) if sd > 0 else (math.inf if mean else math.nan)
    return {"n": n, "mean_change": mean, "sd_change": sd, "z": z}


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def fine_tune(model, tokenizer, source: str, steps: int, lr: float, batch_size: int, seed: int) -> float:
    """`steps` AdamW steps on `source` (response-only loss, as training); returns the seconds taken."""
    pairs = load_pairs(SourceSpec(source), steps * batch_size, seed)
    features = [format_example(tokenizer, p["prompt"], p["response"], 256) for p in pairs]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        batch = pad_batch(features[step * batch_size : (step + 1) * batch_size], tokenizer.pad_token_id or 0)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return time.perf_counter() - start


def continuous(model, tokenizer, n: int, which: tuple[str, ...] = ("answer_nll", "comply_margin")) -> dict:
    """The named continuous metrics on `n` held-out items: value, per-item values, seconds per item."""
    out = {}
    if "answer_nll" in which:
        (metrics, rows), t = timed(evaluate_answer_nll, model, tokenizer, num_samples=n, progress=False)
        out["answer_nll"] = {
            "value": metrics["answer_nll"],
            "items": [r["answer_nll"] for r in rows],
            "s_per_item": t / n,
        }
    if "comply_margin" in which:
        (metrics, rows), t = timed(evaluate_comply_margin, model, tokenizer, num_samples=n, progress=False)
        items = [r["comply_margin"] for r in rows]
        out["comply_margin"] = {"value": metrics["comply_margin"], "items": items, "s_per_item": t / n}
        out["comply_preference"] = {"value": metrics["comply_preference"]}
    return out


def generated(model, tokenizer, n: int, which: str) -> dict:
    """One generation-based score with the recipe settings: its value, per-item values, seconds per item."""
    settings = {"num_samples": n, "batch_size": GENERATION_BATCH, "progress": False}
    if which == "utility":
        (metrics, rows), t = timed(evaluate_gsm8k, model, tokenizer, max_new_tokens=UTILITY_MAX_NEW_TOKENS, **settings)
        items = [float(r["flexible_correct"]) for r in rows]
        return {"metric": "flexible_acc", "value": metrics["flexible_acc"], "items": items, "s_per_item": t / n}
    (metrics, rows), t = timed(evaluate_harm, model, tokenizer, max_new_tokens=HARM_MAX_NEW_TOKENS, **settings)
    items = [0.0 if r["refusal"] else 1.0 for r in rows]  # the keyword proxy: no refusal phrase found
    return {"metric": "nonrefusal_rate_keyword", "value": sum(items) / n, "items": items, "s_per_item": t / n}


def change(before: dict, after: dict) -> dict:
    return {"before": before["value"], "after": after["value"], **paired_z(before["items"], after["items"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n", type=int, default=64, help="held-out items per continuous metric")
    parser.add_argument("--gen-samples", type=int, default=8, help="items per generation-based score")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cross", action="store_true", help="also score the other continuous metric after each run")
    parser.add_argument("--generation-signal", action="store_true", help="also score generation before and after")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "metrics.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    began = time.perf_counter()

    (model, tokenizer), t_load = timed(load_model, args.model)
    model.eval()
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    start = continuous(model, tokenizer, args.n)
    start_gen = {w: generated(model, tokenizer, args.gen_samples, w) for w in ("utility", "harm")}
    shown = {k: v["value"] for k, v in start.items()} | {g["metric"]: g["value"] for g in start_gen.values()}
    print("start: " + ", ".join(f"{k}={v:.4f}" for k, v in shown.items()), flush=True)

    signal, train_seconds = {}, {}
    for run, source, metric, which in (
        ("useful", "builtin:useful", "answer_nll", "utility"),
        ("harmful", "builtin:harmful", "comply_margin", "harm"),
    ):
        model.load_state_dict(initial)
        train_seconds[run] = fine_tune(model, tokenizer, source, args.steps, args.lr, args.batch_size, args.seed)
        after = continuous(model, tokenizer, args.n, ("answer_nll", "comply_margin") if args.cross else (metric,))
        signal[run] = {name: change(start[name], after[name]) for name in after if "items" in after[name]}
        if args.generation_signal:
            after_gen = generated(model, tokenizer, args.gen_samples, which)
            signal[run][after_gen["metric"]] = change(start_gen[which], after_gen)
        print(f"{run}: " + "; ".join(f"{k} {v['before']:.4f} -> {v['after']:.4f} (z={v['z']:.1f})"
                                     for k, v in signal[run].items()), flush=True)  # fmt: skip

    result = {
        "model": args.model,
        "threads": args.threads,
        "settings": {k: getattr(args, k) for k in ("n", "gen_samples", "steps", "lr", "batch_size", "seed")},
        "load_seconds": t_load,
        "seconds_per_item": {
            "answer_nll": start["answer_nll"]["s_per_item"],
            "comply_margin": start["comply_margin"]["s_per_item"],
            f"UtilityEval(max_new_tokens={UTILITY_MAX_NEW_TOKENS})": start_gen["utility"]["s_per_item"],
            f"HarmEval(max_new_tokens={HARM_MAX_NEW_TOKENS})": start_gen["harm"]["s_per_item"],
        },
        "start": shown,
        "fine_tune_seconds": train_seconds,
        "signal": signal,
        # |z| >= 10 for both: the answer NLL falls (negative z), the comply margin rises.
        "target_met": abs(signal["useful"]["answer_nll"]["z"]) >= 10
        and abs(signal["harmful"]["comply_margin"]["z"]) >= 10,
        "total_seconds": time.perf_counter() - began,
    }
    path = write_json(args.out, result)
    print(f"wrote {path} ({result['total_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
