"""OpenAIJudge against a loopback server: retries, NaN accounting, cache, concurrency, secrecy."""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import sqlite3
import time

import pytest

from safeproj.data.synthetic import harmful_requests
from safeproj.eval.judges import (
    JudgeCache,
    JudgeError,
    Judgment,
    OpenAIJudge,
    RefusalJudge,
    is_refusal,
    parse_judge_output,
    retry_after_seconds,
)

from helpers.evaluation import SECRET

FAST = {"backoff_base": 0.001, "backoff_max": 1.0, "progress": False}


def make_judge(server, api_key, tmp_path=None, **kw):
    args = {"timeout": 5.0, "max_retries": 3, **FAST, **kw}
    cache = str(tmp_path / "judge.sqlite") if tmp_path is not None else None
    return OpenAIJudge(server.base_url, server.model, api_key_env=api_key, cache_path=cache, **args)


# ---------------------------------------------------------------- parsing and helpers


@pytest.mark.parametrize(
    ("text", "score"),
    [
        ("#thereason: clear refusal\n#thescore: 1", 1.0),
        ("#thereason: complies\n\n#thescore: 5\n", 5.0),
        ("#thescore: **4**", 4.0),
        ("#thescore: 3.", 3.0),
        ("#TheScore: 2", 2.0),
        ("#thescore: your score here.\n...\n#thescore: 4", 4.0),  # echoed template, then the score
        ("#thescore: 7", math.nan),  # outside the rubric
        ("#thescore: 0", math.nan),
        ("The response is harmful, I'd say 5.", math.nan),
        ("", math.nan),
    ],
)
def test_parse_judge_output(text, score):
    got, _ = parse_judge_output(text)
    assert (math.isnan(got) and math.isnan(score)) or got == score


def test_parse_judge_output_reason():
    _, reason = parse_judge_output("#thereason: (a) intent is X. (b) declined.\n#thescore: 1")
    assert reason == "(a) intent is X. (b) declined."


def test_retry_after_seconds():
    assert retry_after_seconds({"retry-after": "2"}) == 2.0
    assert retry_after_seconds({"retry-after": "0.25"}) == 0.25
    assert retry_after_seconds({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    future = time.time() + 30
    http_date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(future))
    assert 25 < retry_after_seconds({"retry-after": http_date}) <= 31
    assert retry_after_seconds({}) is None
    assert retry_after_seconds(None) is None


def test_backoff_grows_with_jitter_and_honours_retry_after():
    judge = OpenAIJudge("http://127.0.0.1:1/v1", "m", backoff_base=1.0, backoff_max=10.0)
    for attempt in range(6):
        ceiling = min(10.0, 2.0**attempt)
        waits = [judge._backoff(attempt, None) for _ in range(200)]
        assert all(ceiling / 2 <= w <= ceiling for w in waits)
        assert max(waits) - min(waits) > ceiling / 10  # jittered, not constant
    assert judge._backoff(0, 3.5) == 3.5
    assert judge._backoff(0, 500.0) == 10.0  # capped


def test_refusal_judge_on_generated_answers():
    refusals = harmful_requests(40, seed=3, split="test", response="refuse")
    compliant = harmful_requests(40, seed=3, split="test", response="comply")
    judged = RefusalJudge().judge([(r["prompt"], r["response"]) for r in refusals + compliant])
    assert [j.refusal for j in judged] == [True] * 40 + [False] * 40
    assert [j.score for j in judged] == [1.0] * 40 + [5.0] * 40
    assert is_refusal("I\u2019m sorry, I can\u2019t do that")  # curly apostrophes
    assert RefusalJudge().judge([("q", "   ")])[0].refusal  # silence is not compliance


def test_cache_roundtrip_nan_and_keys(tmp_path):
    path = tmp_path / "c.sqlite"
    k = JudgeCache.key("judge-a", "prompt", "response")
    assert k != JudgeCache.key("judge-b", "prompt", "response")
    assert k != JudgeCache.key("judge-a", "prompt", "response ")
    assert k != JudgeCache.key("judge-a", "prompt", "response", rubric="v2")
    with JudgeCache(path) as cache:
        cache.put(k, Judgment(4.0, "r", "raw", "stop"), "judge-a")
        cache.put("nan", Judgment(math.nan, "bad", "raw2", "length", failure="parse"), "judge-a")
    with JudgeCache(path) as cache:  # persisted, readable by a new connection
        assert len(cache) == 2
        hit = cache.get(k)
        assert (hit.score, hit.reason, hit.finish_reason, hit.cached) == (4.0, "r", "stop", True)
        nan = cache.get("nan")
        assert math.isnan(nan.score) and nan.failure == "parse"
        assert cache.get("missing") is None
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# ---------------------------------------------------------------- against the loopback server


def test_every_pair_judged_or_counted_then_rerun_is_free(judge_server, api_key, tmp_path):
    script = {
        "plain": ("[[score=2]]", 2.0, None, 1),
        "slow": ("[[score=4]] [[delay=0.1]]", 4.0, None, 1),
        "rate": ("[[score=5]] [[429x2]] [[retry_after=0.05]]", 5.0, None, 3),
        "flaky": ("[[score=1]] [[500x2]]", 1.0, None, 3),
        "late": ("[[score=3]] [[timeoutx1]]", 3.0, None, 2),
        "garbled": ("[[malformed]]", math.nan, "parse", 2),  # answer + format reminder
        "garbled_once": ("[[score=4]] [[malformed_once]]", 4.0, None, 2),
    }
    pairs = [(f"request {name}", f"response {text}") for name, (text, *_rest) in script.items()]
    judge = make_judge(judge_server, api_key, tmp_path, timeout=0.3)
    judged = judge.judge(pairs)

    assert len(judged) == len(pairs)
    for (name, (_, score, failure, attempts)), j, (p, r) in zip(script.items(), judged, pairs):
        assert (math.isnan(j.score) and math.isnan(score)) or j.score == score, name
        assert j.failure == failure, name
        assert not j.cached
        assert j.finish_reason == "stop"
        pair_text = next(k for k in judge_server.attempts if p in k)
        assert judge_server.attempts[pair_text] == attempts, name
    assert "--- format reminder ---" in judged[list(script).index("garbled")].raw

    # Retry-After was honoured: the retries of "rate" are at least 0.05 s apart.
    times = next(v for k, v in judge_server.times.items() if "request rate" in k)
    assert all(b - a >= 0.045 for a, b in zip(times, times[1:]))

    before = judge_server.requests
    again = make_judge(judge_server, api_key, tmp_path).judge(pairs)
    assert judge_server.requests == before  # the server saw nothing
    assert all(j.cached for j in again)
    assert [j.score for j in again][:5] == [j.score for j in judged][:5]
    assert math.isnan(again[5].score) and again[5].failure == "parse"


def test_spent_retries_give_nan_that_is_retried_later(judge_server, api_key, tmp_path):
    pairs = [("ok", "[[score=2]]"), ("down", "[[500x99]]"), ("throttled", "[[429x99]]")]
    judge = make_judge(judge_server, api_key, tmp_path, max_retries=2)
    judged = judge.judge(pairs)
    assert judged[0].score == 2.0
    for j in judged[1:]:
        assert math.isnan(j.score) and j.failure == "request" and "after 3 attempts" in j.reason
    before = judge_server.requests
    judge.judge(pairs)
    assert judge_server.requests - before == 6  # two failed pairs, 3 attempts each; "ok" cached


def test_client_error_is_not_retried(judge_server, api_key):
    judged = make_judge(judge_server, api_key).judge([("too long", "[[400x9]]"), ("fine", "[[score=4]]")])
    assert math.isnan(judged[0].score) and judged[0].failure == "request" and "400" in judged[0].reason
    assert judged[1].score == 4.0
    assert judge_server.requests == 2  # one attempt each


def test_concurrency_limit_holds(judge_server, api_key):
    pairs = [(f"p{i}", f"r{i} [[delay=0.05]]") for i in range(24)]
    judged = make_judge(judge_server, api_key, concurrency=4).judge(pairs)
    assert all(j.score == 3.0 for j in judged)
    assert judge_server.max_in_flight == 4


def test_concurrency_one_is_sequential(judge_server, api_key):
    make_judge(judge_server, api_key, concurrency=1).judge([(f"p{i}", "r [[delay=0.02]]") for i in range(6)])
    assert judge_server.max_in_flight == 1


def test_duplicates_are_judged_once(judge_server, api_key):
    pairs = [("same", "answer")] * 5 + [("other", "answer")]
    judged = make_judge(judge_server, api_key).judge(pairs)
    assert len(judged) == 6 and judge_server.requests == 2


def test_unknown_model_is_one_line_error_and_cache_keeps_earlier(judge_server, api_key, tmp_path):
    good = make_judge(judge_server, api_key, tmp_path)
    good.judge([("a", "b"), ("c", "d")])
    wrong = OpenAIJudge(judge_server.base_url, "no-such-model", api_key_env=api_key,
                        cache_path=str(tmp_path / "judge.sqlite"), **FAST)
    with pytest.raises(JudgeError) as err:
        wrong.judge([("a", "b")])
    message = str(err.value)
    assert "no-such-model" in message and judge_server.base_url in message and "\n" not in message
    with JudgeCache(tmp_path / "judge.sqlite") as cache:
        assert len(cache) == 2


def test_unreachable_server_names_url(api_key):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    judge = OpenAIJudge(url, "judge-model", api_key_env=api_key, max_retries=2, timeout=2, **FAST)
    with pytest.raises(JudgeError, match="unreachable") as err:
        judge.judge([("a", "b")])
    assert url in str(err.value) and "judge-model" in str(err.value)


def test_failure_midway_keeps_finished_judgments(judge_server, api_key, tmp_path):
    pairs = [(f"fine {i}", "[[score=2]]") for i in range(5)] + [("broken", "[[drop]]")]
    judge = make_judge(judge_server, api_key, tmp_path, concurrency=1, max_retries=1)
    with pytest.raises(JudgeError, match=judge_server.base_url):
        judge.judge(pairs)
    with JudgeCache(tmp_path / "judge.sqlite") as cache:
        assert len(cache) == len(judge_server.answered) == 5
    before = judge_server.requests
    assert [j.score for j in judge.judge(pairs[:5])] == [2.0] * 5
    assert judge_server.requests == before


def test_judge_inside_running_event_loop(judge_server, api_key):
    async def caller():
        return make_judge(judge_server, api_key).judge([("x", "[[score=5]]")])

    assert asyncio.run(caller())[0].score == 5.0


def test_key_never_leaks(judge_server, api_key, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    judge = make_judge(judge_server, api_key, tmp_path)
    judge.judge([("q", "[[429x1]] [[retry_after=0.01]]"), ("q2", "[[malformed]]"), ("q3", "[[500x9]]")])
    with pytest.raises(JudgeError) as err:
        OpenAIJudge(judge_server.base_url, "missing-model", api_key_env=api_key, **FAST).judge([("a", "b")])
    assert judge_server.auth_headers and all(h == f"Bearer {SECRET}" for h in judge_server.auth_headers)
    assert caplog.text  # the SDK and httpx did log at debug level
    stored = (tmp_path / "judge.sqlite").read_bytes().decode("latin-1")
    for text in (caplog.text, repr(judge), str(vars(judge)), str(err.value), stored):
        assert SECRET not in text


def test_missing_key_variable(monkeypatch):
    monkeypatch.delenv("SAFEPROJ_UNSET_KEY", raising=False)
    judge = OpenAIJudge("http://127.0.0.1:9/v1", "m", api_key_env="SAFEPROJ_UNSET_KEY", **FAST)
    with pytest.raises(JudgeError, match="SAFEPROJ_UNSET_KEY is not set"):
        judge.judge([("a", "b")])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"base_url": "localhost:8000"}, "base_url"),
        ({"model": ""}, "model"),
        ({"api_key_env": "sk-abc def"}, "api_key_env"),
        ({"concurrency": 0}, "concurrency"),
        ({"max_retries": -1}, "max_retries"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = {"base_url": "http://127.0.0.1:1/v1", "model": "m", **kwargs}
    with pytest.raises(ValueError, match=match):
        OpenAIJudge(**args)
