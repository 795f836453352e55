"""OpenAIJudge against a loopback server: retries, NaN accounting, cache, concurrency, run-wide errors."""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import socket
import sqlite3

import pytest
from tenacity import RetryCallState

from helpers.evaluation import SECRET
from safeproj.data.synthetic import harmful_requests
from safeproj.eval.judges import (
    PARSE,
    REQUEST,
    JudgeCache,
    JudgeError,
    OpenAIJudge,
    RefusalJudge,
    is_refusal,
)
from safeproj.eval.judges.retrying import RetryPolicy

FAST = {"backoff_base": 0.001, "backoff_max": 1.0, "progress": False}


def make_judge(server, api_key, tmp_path=None, **kw):
    args = {"timeout": 5.0, "max_retries": 3, **FAST, **kw}
    cache = str(tmp_path / "judge.sqlite") if tmp_path is not None else None
    return OpenAIJudge(server.base_url, server.model, api_key_env=api_key, cache_path=cache, **args)


# ---------------------------------------------------------------- offline pieces


def _state_after(error: BaseException, attempt: int) -> RetryCallState:
    state = RetryCallState(None, None, (), {})
    state.attempt_number = attempt
    state.set_exception((type(error), error, None))
    return state


def test_retry_wait_has_jitter_and_honours_retry_after():
    import httpx2
    import openai

    def rate_limit(headers):
        request = httpx2.Request("POST", "http://x/v1/chat/completions")
        response = httpx2.Response(429, headers=headers, request=request)
        return openai.RateLimitError("limited", response=response, body=None)

    random.seed(0)
    policy = RetryPolicy(max_retries=5, rate_limit_patience=10, backoff_base=1.0, backoff_max=10.0)
    for attempt in range(1, 6):
        ceiling = min(10.0, 2.0 ** (attempt - 1))
        waits = [policy.wait(_state_after(ValueError("x"), attempt)) for _ in range(200)]
        assert all(0 <= w <= ceiling for w in waits)
        assert max(waits) - min(waits) > ceiling / 2  # full jitter: spread over the whole range
    waits = [policy.wait(_state_after(rate_limit({"retry-after": "3.5"}), 1)) for _ in range(100)]
    assert all(3.5 <= w <= 3.5 * 1.25 for w in waits) and len(set(waits)) > 50  # honoured, not in lockstep
    assert 10.0 <= policy.wait(_state_after(rate_limit({"retry-after": "500"}), 1)) <= 12.5  # capped
    soon = [policy.wait(_state_after(rate_limit({"retry-after": "soon"}), 2)) for _ in range(50)]
    assert all(0 <= w <= 2.0 for w in soon)  # unparsable: ordinary backoff


def test_retry_budget_counts_rate_limits_by_time():
    policy = RetryPolicy(max_retries=1, rate_limit_patience=60, backoff_base=1, backoff_max=1)
    assert not policy.stop(_state_after(ValueError("x"), 1))
    assert policy.stop(_state_after(ValueError("x"), 2))  # second non-rate-limit failure: spent


def test_refusal_judge_on_generated_answers():
    refusals = harmful_requests(40, seed=3, split="test", response="refuse")
    compliant = harmful_requests(40, seed=3, split="test", response="comply")
    judged = RefusalJudge().judge([(r["prompt"], r["response"]) for r in refusals + compliant])
    assert [j.refusal for j in judged] == [True] * 40 + [False] * 40
    assert [j.score for j in judged] == [1.0] * 40 + [5.0] * 40
    assert all(j.judge == RefusalJudge.name and "proxy" in j.judge for j in judged)
    assert is_refusal("I\u2019m sorry, I can\u2019t do that")  # curly apostrophes


# ---------------------------------------------------------------- against the loopback server


def test_every_pair_judged_or_counted_then_rerun_asks_only_for_holes(judge_server, api_key, tmp_path):
    script = {
        "plain": ("[[score=2]]", 2.0, None, 1),
        "slow": ("[[score=4]] [[delay=0.1]]", 4.0, None, 1),
        "rate": ("[[score=5]] [[429x2]] [[retry_after=0.05]]", 5.0, None, 3),
        "flaky": ("[[score=1]] [[500x2]]", 1.0, None, 3),
        "late": ("[[score=3]] [[timeoutx1]]", 3.0, None, 2),
        "garbled": ("[[malformed]]", math.nan, PARSE, 2),  # answer + format reminder
        "garbled_once": ("[[score=4]] [[malformed_once]]", 4.0, None, 2),
    }
    pairs = [(f"request {name}", f"response {text}") for name, (text, *_rest) in script.items()]
    judge = make_judge(judge_server, api_key, tmp_path, timeout=0.3)
    judged = judge.judge(pairs)

    assert len(judged) == len(pairs)
    for (name, (_, score, failure, attempts)), j, (p, _r) in zip(script.items(), judged, pairs):
        assert (math.isnan(j.score) and math.isnan(score)) or j.score == score, name
        assert j.failure == failure, name
        assert not j.cached and j.finish_reason == "stop" and j.judge == judge.name
        assert judge_server.attempts_for(f"User: {p}\n") == attempts, name
    garbled = judged[list(script).index("garbled")]
    assert "--- format reminder ---" in garbled.raw and garbled.reason.startswith("no valid score")

    # Retry-After was honoured: the retries of "rate" are at least 0.05 s apart.
    times = next(v for k, v in judge_server.times.items() if "request rate" in k)
    assert all(b - a >= 0.045 for a, b in itertools.pairwise(times))

    before = judge_server.requests
    again = make_judge(judge_server, api_key, tmp_path).judge(pairs)
    assert judge_server.requests - before == 2  # only the NaN was asked again (answer + reminder)
    assert [j.cached for j in again] == [True] * 5 + [False, True]
    assert [j.score for j in again][:5] == [j.score for j in judged][:5]
    assert math.isnan(again[5].score) and again[5].failure == PARSE


def test_cached_nan_kept_when_not_rejudging(judge_server, api_key, tmp_path):
    pairs = [("a", "[[malformed]]")]
    make_judge(judge_server, api_key, tmp_path).judge(pairs)
    before = judge_server.requests
    again = make_judge(judge_server, api_key, tmp_path, rejudge_failed=False).judge(pairs)
    assert judge_server.requests == before and again[0].cached and again[0].failure == PARSE


def test_spent_retries_give_nan_that_is_retried_later(judge_server, api_key, tmp_path):
    pairs = [("ok", "[[score=2]]"), ("down", "[[500x99]]"), ("throttled", "[[429x99]]")]
    judge = make_judge(judge_server, api_key, tmp_path, max_retries=2, rate_limit_patience=0.6)
    judged = judge.judge(pairs)
    assert judged[0].score == 2.0
    assert judged[1].failure == REQUEST and "HTTP 500" in judged[1].reason and "after 3 attempts" in judged[1].reason
    assert judged[2].failure == REQUEST and "HTTP 429" in judged[2].reason
    throttled = judge_server.attempts_for("throttled")
    assert throttled > 3  # rate limits have their own budget (time), not max_retries
    before = judge_server.requests
    judge.judge(pairs)
    assert judge_server.attempts_for("down") == 6 and judge_server.attempts_for("throttled") > throttled
    assert judge_server.requests - before == 3 + judge_server.attempts_for("throttled") - throttled  # "ok" cached


def test_client_error_is_not_retried(judge_server, api_key):
    judged = make_judge(judge_server, api_key).judge([("too long", "[[400x9]]"), ("fine", "[[score=4]]")])
    assert math.isnan(judged[0].score) and judged[0].failure == REQUEST and "400" in judged[0].reason
    assert judged[1].score == 4.0
    assert judge_server.requests == 2  # one attempt each


def test_concurrency_limit_holds(judge_server, api_key):
    pairs = [(f"p{i}", f"r{i} [[delay=0.05]]") for i in range(24)]
    judge = make_judge(judge_server, api_key, concurrency=4)
    judged = judge.judge(pairs)
    assert all(j.score == 3.0 for j in judged)
    assert judge_server.max_in_flight == 4 and judge.last_pacing.max_in_flight == 4


def test_concurrency_one_is_sequential(judge_server, api_key):
    make_judge(judge_server, api_key, concurrency=1).judge([(f"p{i}", "r [[delay=0.02]]") for i in range(6)])
    assert judge_server.max_in_flight == 1


def test_duplicates_are_judged_once(judge_server, api_key):
    pairs = [("same", "answer")] * 5 + [("other", "answer")]
    judged = make_judge(judge_server, api_key).judge(pairs)
    assert len(judged) == 6 and judge_server.requests == 2


def test_sampling_parameters_reach_the_server_and_the_cache_key(judge_server, api_key, tmp_path):
    make_judge(judge_server, api_key, tmp_path, temperature=0.7, top_p=0.9, max_tokens=256, seed=5).judge([("a", "b")])
    body = judge_server.bodies[-1]
    assert (body["temperature"], body["top_p"], body["max_tokens"], body["seed"]) == (0.7, 0.9, 256, 5)
    make_judge(judge_server, api_key, tmp_path, temperature=None).judge([("a", "b")])
    assert "temperature" not in judge_server.bodies[-1] and judge_server.requests == 2  # other key: asked again


def test_template_change_reasks_every_pair(judge_server, api_key, tmp_path):
    pairs = [(f"p{i}", f"r{i}") for i in range(20)]
    make_judge(judge_server, api_key, tmp_path).judge(pairs)
    custom = tmp_path / "mine.txt"
    custom.write_text("Judge this.\nUser: {prompt}\nResponse: {response}\n#thescore: 1-5\n")
    judge = make_judge(judge_server, api_key, tmp_path, template=str(custom))
    judge.judge(pairs)
    assert judge_server.requests == 40
    assert judge_server.bodies[-1]["messages"][0]["content"].startswith("Judge this.\nUser: p")
    assert "mine@" in judge.name and "mine@" in repr(judge)
    with JudgeCache(tmp_path / "judge.sqlite") as cache:
        assert len(cache) == 40
    rubrics = {
        r[0].split("@")[0] for r in sqlite3.connect(tmp_path / "judge.sqlite").execute("SELECT rubric FROM judgments")
    }
    assert rubrics == {"paper", "mine"}


def test_unknown_model_is_one_line_error_and_cache_keeps_earlier(judge_server, api_key, tmp_path):
    good = make_judge(judge_server, api_key, tmp_path)
    good.judge([("a", "b"), ("c", "d")])
    wrong = OpenAIJudge(
        judge_server.base_url, "no-such-model", api_key_env=api_key, cache_path=str(tmp_path / "judge.sqlite"), **FAST
    )
    with pytest.raises(JudgeError) as err:
        wrong.judge([("a", "b")])
    message = str(err.value)
    assert "no-such-model" in message and judge_server.base_url in message and "\n" not in message
    with JudgeCache(tmp_path / "judge.sqlite") as cache:
        assert len(cache) == 2


def test_exhausted_quota_stops_the_run(judge_server, api_key):
    with pytest.raises(JudgeError, match="quota"):
        make_judge(judge_server, api_key).judge([("a", "[[quota]]")])
    assert judge_server.requests == 1


def test_unreachable_server_names_url(api_key):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    judge = OpenAIJudge(url, "judge-model", api_key_env=api_key, max_retries=2, timeout=2, **FAST)
    with pytest.raises(JudgeError, match="unreachable") as err:
        judge.judge([("a", "b")])
    assert url in str(err.value) and "judge-model" in str(err.value) and "\n" not in str(err.value)


def test_dropped_connection_midway_costs_one_pair(judge_server, api_key, tmp_path):
    pairs = [(f"fine {i}", "[[score=2]]") for i in range(5)] + [("broken", "[[drop]]"), ("after", "[[score=4]]")]
    judge = make_judge(judge_server, api_key, tmp_path, concurrency=1, max_retries=1)
    judged = judge.judge(pairs)
    assert [j.score for j in judged[:5]] == [2.0] * 5 and judged[6].score == 4.0
    assert judged[5].failure == REQUEST and "connection" in judged[5].reason
    with JudgeCache(tmp_path / "judge.sqlite") as cache:
        assert cache.count_final() == 6 and len(cache) == 7


def test_judge_inside_running_event_loop(judge_server, api_key, tmp_path):
    async def caller():  # as in a notebook: judging then runs on a thread of its own
        return make_judge(judge_server, api_key, tmp_path).judge([("x", "[[score=5]]")])

    assert asyncio.run(caller())[0].score == 5.0
    with JudgeCache(tmp_path / "judge.sqlite") as cache:
        assert cache.count_final() == 1


def test_missing_key_variable(monkeypatch):
    monkeypatch.delenv("SAFEPROJ_UNSET_KEY", raising=False)
    judge = OpenAIJudge("http://127.0.0.1:9/v1", "m", api_key_env="SAFEPROJ_UNSET_KEY", **FAST)
    with pytest.raises(JudgeError, match="SAFEPROJ_UNSET_KEY is not set"):
        judge.judge([("a", "b")])


def test_key_in_no_file_or_repr(judge_server, api_key, tmp_path):
    judge = make_judge(judge_server, api_key, tmp_path)
    judge.judge([("q", "[[429x1]] [[retry_after=0.01]]"), ("q2", "[[malformed]]"), ("q3", "[[500x9]]")])
    assert judge_server.auth_headers and all(h == f"Bearer {SECRET}" for h in judge_server.auth_headers)
    stored = (tmp_path / "judge.sqlite").read_bytes().decode("latin-1")
    for text in (repr(judge), str(vars(judge)), stored):
        assert SECRET not in text


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"base_url": "localhost:8000"}, "base_url"),
        ({"model": ""}, "model"),
        ({"api_key_env": "sk-abc def"}, "api_key_env"),
        ({"concurrency": 0}, "concurrency"),
        ({"max_retries": -1}, "max_retries"),
        ({"temperature": 3.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"template": "no-such-template"}, "template"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = {"base_url": "http://127.0.0.1:1/v1", "model": "m", **kwargs}
    with pytest.raises(ValueError, match=match):
        OpenAIJudge(**args)
