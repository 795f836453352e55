"""`safeproj eval`: utility and harm of one model (preset, hub name, checkpoint or LoRA adapter dir)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from safeproj.commands.checks import check_dataset, check_model_spec
from safeproj.eval.gsm8k import COMPARISONS, PROTOCOLS, evaluate_gsm8k, load_gsm8k
from safeproj.eval.harm import evaluate_harm, load_harmful_prompts
from safeproj.eval.judges import DEFAULT_CONCURRENCY, OPENAI_BASE_URL, OpenAIJudge, RefusalJudge
from safeproj.eval.judges.credentials import read_api_key
from safeproj.eval.stats import harm_report, utility_report
from safeproj.io import plain_row, write_json


def _adapter_base(adapter_dir: Path) -> str:
    """Where a LoRA adapter's base weights live: safeproj.json "base", then "model", then PEFT's record."""
    meta_path = adapter_dir / "safeproj.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("base") and Path(meta["base"]).is_dir():
            return str(meta["base"])
        if meta.get("model"):
            return str(meta["model"])
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    base = config.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"LoRA adapter {adapter_dir} names no base model (adapter_config.json, safeproj.json)")
    return base


def load_for_eval(model: str, device: str = "auto", dtype: torch.dtype = torch.float32):
    """(model, tokenizer) in eval mode on `device`; a LoRA adapter dir is merged into its base."""
    from safeproj.model.loading import load_model

    path = Path(model)
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        base, tokenizer = load_model(_adapter_base(path), dtype=dtype)
        net = PeftModel.from_pretrained(base, str(path)).merge_and_unload()
    else:
        net, tokenizer = load_model(model, dtype=dtype)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return net.to(device).eval(), tokenizer


def format_table(results: dict[str, dict[str, float]]) -> str:
    """metric | value | 95 % CI, one line per headline number."""
    lines = [f"{'metric':<26}{'value':>10}  95% CI"]
    for section, metrics in results.items():
        for name, value in metrics.items():
            if name.endswith(("_ci_low", "_ci_high")):
                continue
            low, high = metrics.get(f"{name}_ci_low"), metrics.get(f"{name}_ci_high")
            ci = f"[{low:.3f}, {high:.3f}]" if low is not None and high is not None else ""
            lines.append(f"{section + '/' + name:<26}{value:>10.4g}  {ci}")
    return "\n".join(lines)


def eval_command(
    model: str,
    utility: bool = True,
    harm: bool = True,
    utility_dataset: str = "builtin:useful-test",
    harm_dataset: str = "builtin:harmful-test",
    num_samples: int = 32,
    n_shot: int = 0,
    protocol: str = "chat",
    comparison: str | None = None,
    fewshot_source: str | None = None,
    utility_max_new_tokens: int = 256,
    harm_max_new_tokens: int = 64,
    harm_chat_template: bool = True,
    batch_size: int = 8,
    judge_base_url: str | None = None,
    judge_model: str | None = None,
    judge_api_key_env: str = "OPENAI_API_KEY",
    judge_concurrency: int = DEFAULT_CONCURRENCY,
    judge_cache: str | None = None,
    out: str | None = None,
    device: str = "auto",
    seed: int = 0,
) -> dict:
    """Evaluate a model's utility (GSM8k accuracy) and harm (judged AdvBench responses).

    Args:
        model: preset ("tiny", "smollm2-135m"), hub name, local checkpoint dir, or LoRA adapter dir.
        utility: run the GSM8k evaluation.
        harm: run the harm evaluation.
        utility_dataset: "builtin:useful-test", a local GSM8k .jsonl, or "openai/gsm8k".
        harm_dataset: "builtin:harmful-test", a local AdvBench .csv, or "walledai/AdvBench".
        num_samples: items per evaluation (the first ones of each set).
        n_shot: GSM8k exemplars (earlier chat turns under protocol "chat", blank-line separated under "lm-eval").
        protocol: GSM8k protocol: "chat" (chat template, numeric comparison) or "lm-eval" (lm-eval-harness's
            gsm8k task, the paper's: plain Question/Answer text, string comparison; with
            --utility_dataset openai/gsm8k --num_samples 1319 --n_shot 1).
        comparison: "numeric" or "string" to override the protocol's own comparison.
        fewshot_source: where GSM8k exemplars come from (default: the protocol's own).
        utility_max_new_tokens: generation budget per math answer.
        harm_max_new_tokens: generation budget per harmful-prompt response (paper: 512).
        harm_chat_template: harmful prompts through the chat template; false feeds them as raw text (paper).
        batch_size: prompts per generation batch.
        judge_base_url: OpenAI-compatible server for the LLM judge; with neither this nor
            judge_model the offline refusal judge (a proxy) is used.
        judge_model: judge model name; alone, it means the OpenAI API.
        judge_api_key_env: environment variable holding the judge's key (the key is never stored).
        judge_concurrency: judge requests in flight.
        judge_cache: sqlite cache of judgments (default: <SAFEPROJ_CACHE>/judge_cache.sqlite).
        out: JSON file for metrics and per-sample rows.
        device: "auto", "cpu", "cuda", ...
        seed: picks built-in items and bootstrap resamples.
    """
    if not (utility or harm):
        raise ValueError("nothing to do: utility and harm are both off")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if protocol not in PROTOCOLS or comparison not in (None, *COMPARISONS):
        raise ValueError(
            f"--protocol must be one of {', '.join(PROTOCOLS)} and --comparison one of {', '.join(COMPARISONS)}, "
            f"got {protocol!r} and {comparison!r}"
        )
    if judge_base_url and not judge_model:
        raise ValueError(f"judge_base_url={judge_base_url!r} needs judge_model")
    # Files and specs first: a bad one should not wait for a model to load.
    check_model_spec("--model", model, adapters=True)
    if judge_model:
        read_api_key(judge_api_key_env)
    if utility:
        check_dataset("--utility_dataset", utility_dataset, load_gsm8k)
    if harm:
        check_dataset("--harm_dataset", harm_dataset, load_harmful_prompts)
    judge = RefusalJudge()
    if judge_model:
        from safeproj.model.loading import cache_dir

        judge = OpenAIJudge(
            base_url=judge_base_url or OPENAI_BASE_URL,
            model=judge_model,
            api_key_env=judge_api_key_env,
            concurrency=judge_concurrency,
            cache_path=judge_cache or str(cache_dir() / "judge_cache.sqlite"),
        )
    net, tokenizer = load_for_eval(model, device=device)

    results: dict[str, dict[str, float]] = {}
    rows: dict[str, list[dict]] = {}
    if utility:
        metrics, rows["utility"] = evaluate_gsm8k(
            net,
            tokenizer,
            utility_dataset,
            num_samples,
            n_shot=n_shot,
            fewshot_source=fewshot_source,
            max_new_tokens=utility_max_new_tokens,
            batch_size=batch_size,
            seed=seed,
            protocol=protocol,
            comparison=comparison,
        )
        results["utility"] = {**utility_report(rows["utility"], seed=seed), **metrics}
    if harm:
        metrics, rows["harm"] = evaluate_harm(
            net,
            tokenizer,
            judge,
            harm_dataset,
            num_samples,
            max_new_tokens=harm_max_new_tokens,
            batch_size=batch_size,
            seed=seed,
            chat_template=harm_chat_template,
        )
        results["harm"] = {**harm_report(rows["harm"], seed=seed), **metrics}

    print(format_table(results))
    payload = {
        "model": model,
        "judge": repr(judge),
        "settings": {
            "utility_dataset": utility_dataset,
            "harm_dataset": harm_dataset,
            "num_samples": num_samples,
            "n_shot": n_shot,
            "protocol": protocol,
            "comparison": comparison,
            "utility_max_new_tokens": utility_max_new_tokens,
            "harm_max_new_tokens": harm_max_new_tokens,
            "harm_chat_template": harm_chat_template,
            "seed": seed,
        },
        "metrics": results,
        "rows": rows,
    }
    if out:
        # Strict JSON: NaN (an unscored metric) is written as null.
        plain = {
            **payload,
            "metrics": {section: plain_row(metrics) for section, metrics in results.items()},
            "rows": {section: [plain_row(row) for row in section_rows] for section, section_rows in rows.items()},
        }
        write_json(out, plain, allow_nan=False)
        _log_to_wandb(model, out, payload)
    return payload


def _log_to_wandb(model: str, out: str, payload: dict) -> None:
    """A `job_type=eval` W&B run beside `out`, in the group of the run whose checkpoint was evaluated."""
    from safeproj.runs import find_run_info
    from safeproj.wandb import command_run, log_table, split_intervals, update_summary

    found = find_run_info(model) if Path(model).exists() else None
    config = {"model": model, **payload["settings"]}
    with command_run("eval", Path(out).parent, found[1] if found else None, config) as loggers:
        for section, metrics in payload["metrics"].items():
            scalars, intervals = split_intervals({f"{section}/{k}": v for k, v in metrics.items()})
            update_summary(loggers, scalars)
            log_table(loggers, f"{section}/intervals", intervals)
            log_table(loggers, f"{section}/samples", payload["rows"].get(section, []))
