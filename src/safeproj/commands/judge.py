"""`safeproj judge`: judge the harm rows of an existing `safeproj eval` output again with an LLM judge.

By default only the holes are filled (`--rejudge_failed true`): rows whose judgment has no score,
because a request kept failing or the answer could not be parsed, are asked again; scored rows and
degenerate outputs stay as they are. With `--rejudge_failed false` every row is judged by the given
judge (for instance to replace the offline refusal proxy with an LLM judge); the cache makes rows
it has already judged free. Metrics are recomputed from the rows and the file is rewritten
atomically (or written to `--out`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from safeproj import io
from safeproj.eval.harm import HarmMetric
from safeproj.eval.judges import DEFAULT_CONCURRENCY, DEGENERATE, OPENAI_BASE_URL, Judgment, OpenAIJudge
from safeproj.eval.stats import harm_report


def _rows_to_judge(rows: list[dict], judge: OpenAIJudge, payload_judge: str, rejudge_failed: bool) -> list[int]:
    """Indices of the rows to send; refuses to fill one judge's holes with another judge's scores."""
    if not rejudge_failed:
        return list(range(len(rows)))
    scored_by = {row.get("judge") or payload_judge for row in rows if row.get("score") is not None}
    others = sorted(name for name in scored_by if name != judge.name)
    if others:
        raise ValueError(
            f"the scored rows were judged by {', '.join(others)}, not {judge.name}; filling their holes with "
            "another judge would mix two scales: pass --rejudge_failed false to judge every row again"
        )
    return [i for i, row in enumerate(rows) if row.get("score") is None and row.get("failure") != DEGENERATE]


def _harm_metrics(rows: list[dict], seed: int) -> dict[str, float]:
    judgments = [Judgment(math.nan if r.get("score") is None else r["score"], failure=r.get("failure")) for r in rows]
    metric = HarmMetric()
    metric.update(judgments, [r.get("refusal") for r in rows])
    return {**harm_report(rows, seed=seed), **{k: float(v) for k, v in metric.compute().items()}}


def judge_command(
    eval_output: str,
    judge_model: str = "gpt-4o-mini",
    judge_base_url: str = OPENAI_BASE_URL,
    judge_api_key_env: str = "OPENAI_API_KEY",
    template: str = "paper",
    temperature: float | None = 0.0,
    top_p: float | None = None,
    max_tokens: int | None = None,
    seed: int | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    judge_cache: str | None = None,
    rejudge_failed: bool = True,
    out: str | None = None,
) -> dict:
    """Judge the harm rows of a `safeproj eval --out` file again and recompute its harm metrics.

    Args:
        eval_output: JSON file written by `safeproj eval --out`.
        judge_model: judge model name (the paper: gpt-4o-mini).
        judge_base_url: OpenAI-compatible server, including the API prefix.
        judge_api_key_env: environment variable holding the judge's key (the key is never stored).
        template: judge template: "paper", "qi2023" or a template file.
        temperature: judge sampling temperature; null sends none (the server default).
        top_p: judge nucleus sampling mass; null sends none.
        max_tokens: judge completion token limit; null leaves the server default.
        seed: judge sampling seed for servers that honour it.
        concurrency: judge requests in flight at most.
        judge_cache: sqlite cache of judgments (default: <SAFEPROJ_CACHE>/judge_cache.sqlite).
        rejudge_failed: true: fill the holes only (rows without a score, degenerate outputs
            excepted), with the judge that scored the rest; false: judge every row with this judge.
        out: where to write the updated file (default: rewrite `eval_output` in place).
    """
    path = Path(eval_output)
    if not path.is_file():
        raise FileNotFoundError(f"eval output {eval_output} does not exist")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        rows = payload["rows"]["harm"]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{eval_output} is not a `safeproj eval --out` file with harm rows") from None
    if judge_cache is None:
        from safeproj.model.loading import cache_dir

        judge_cache = str(cache_dir() / "judge_cache.sqlite")
    judge = OpenAIJudge(
        base_url=judge_base_url,
        model=judge_model,
        api_key_env=judge_api_key_env,
        template=template,
        temperature=temperature,
        top_p=top_p,
        max_tokens=max_tokens,
        seed=seed,
        concurrency=concurrency,
        cache_path=judge_cache,
        rejudge_failed=True,
    )
    chosen = _rows_to_judge(rows, judge, str(payload.get("judge", "")), rejudge_failed)
    judged = judge.judge([(rows[i]["prompt"], rows[i]["response"]) for i in chosen]) if chosen else []
    for i, j in zip(chosen, judged):
        rows[i].update(
            score=j.score,
            reason=j.reason,
            failure=j.failure,
            finish_reason=j.finish_reason,
            cached=j.cached,
            judge=j.judge,
        )
        if j.degenerate:
            rows[i]["refusal"] = False
    bootstrap_seed = int(payload.get("settings", {}).get("seed", 0))
    payload.setdefault("metrics", {})["harm"] = io.plain_row(_harm_metrics(rows, bootstrap_seed))
    payload["rows"]["harm"] = [io.plain_row(r) for r in rows]
    payload["judge"] = repr(judge)
    unscored = sum(r["score"] is None for r in payload["rows"]["harm"])
    payload["rejudged"] = {
        "rows_sent": len(chosen),
        "from_cache": sum(j.cached for j in judged),
        "rows_without_score": unscored,
        "rejudge_failed": rejudge_failed,
    }
    io.write_json(out or path, payload, allow_nan=False)
    harm = payload["metrics"]["harm"]
    print(
        f"{judge.name}: {len(chosen)} rows judged ({payload['rejudged']['from_cache']} from cache), "
        f"{unscored} of {len(rows)} without a score ({int(harm['degenerate'])} degenerate); "
        f"mean_score {harm['mean_score']}, refusal_rate {harm['refusal_rate']}"
    )
    return payload
