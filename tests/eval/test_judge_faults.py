"""No single bad reply, header or connection loses judgments; a rate limit costs time, not scores.

Each scripted fault hits one pair in the middle of a batch. Every case checks that the batch
completes in order, that every pair is scored or NaN with a reason, that NaNs are not cached as
final (a rerun asks for them again, and only for them), and that requests stayed within the bound.
"""

from __future__ import annotations

import math
import time

import pytest

from helpers.loopback import LoopbackJudgeServer
from safeproj.eval.judges import PARSE, REQUEST, OpenAIJudge
from safeproj.eval.judges.pacing import Pacer, retry_after_seconds

CONCURRENCY = 3
FAST = {"backoff_base": 0.005, "backoff_max": 0.2, "rate_limit_patience": 0.3, "max_retries": 2, "progress": False}

# fault directive -> (expected score, expected failure, words expected in the reason)
FAULTS = {
    "invalid JSON body": ("[[invalid_json]]", math.nan, REQUEST, "not JSON"),
    "HTML body": ("[[html]]", math.nan, REQUEST, "not JSON"),
    "null content": ("[[null_content]]", math.nan, PARSE, "no text"),
    "empty choices": ("[[no_choices]]", math.nan, REQUEST, "no choices"),
    "{} body": ("[[empty_body]]", math.nan, REQUEST, "no choices"),
    "bad Retry-After": ("[[429x1]] [[retry_after=soon]] [[score=4]]", 4.0, None, ""),
    "HTTP-date Retry-After": ("[[429x1]] [[retry_after=date+1]] [[score=4]]", 4.0, None, ""),
    "sustained 429": ("[[429]]", math.nan, REQUEST, "HTTP 429"),
    "slow past the timeout": ("[[timeout]]", math.nan, REQUEST, "no reply within"),
    "dropped connection": ("[[drop]]", math.nan, REQUEST, "connection"),
    "one HTML reply": ("[[htmlx1]] [[score=5]]", 5.0, None, ""),
    "two dropped connections": ("[[dropx2]] [[score=2]]", 2.0, None, ""),
    "decimal score": ("[[score=4.5]]", math.nan, PARSE, "whole number"),
}


@pytest.fixture
def server():
    with LoopbackJudgeServer(hang=0.3) as s:
        yield s


@pytest.mark.parametrize("fault", list(FAULTS))
def test_fault_costs_at_most_its_own_pair(fault, server, api_key, tmp_path):
    directive, score, failure, words = FAULTS[fault]
    pairs = [(f"good {i}", f"fine [[score={i % 5 + 1}]]") for i in range(8)]
    pairs.insert(4, ("faulty", f"bad {directive}"))
    judge = OpenAIJudge(
        server.base_url,
        server.model,
        api_key_env=api_key,
        concurrency=CONCURRENCY,
        timeout=0.15,
        cache_path=str(tmp_path / "j.sqlite"),
        **FAST,
    )
    judged = judge.judge(pairs)

    assert len(judged) == len(pairs)
    good = [j for i, j in enumerate(judged) if i != 4]
    assert [j.score for j in good] == [float(i % 5 + 1) for i in range(8)]  # in order, none lost
    bad = judged[4]
    assert (math.isnan(bad.score) and math.isnan(score)) or bad.score == score
    assert bad.failure == failure
    assert all(j.scored or (j.failure and j.reason) for j in judged)
    assert words in bad.reason
    assert judge.last_pacing.max_in_flight <= CONCURRENCY
    if "timeout" not in fault:  # a hung request the client gave up on still occupies a server thread
        assert server.max_in_flight <= CONCURRENCY

    asked = server.attempts_for("User: faulty\n")
    before = server.requests
    again = judge.judge(pairs)
    new_requests = server.requests - before
    if bad.scored:
        assert new_requests == 0 and all(j.cached for j in again)
    else:  # the hole is asked for again, nothing else is
        assert new_requests > 0 and server.attempts_for("User: faulty\n") - asked == new_requests
        assert all(j.cached for i, j in enumerate(again) if i != 4) and not again[4].cached


def test_sustained_rate_limit_costs_time_not_scores(api_key):
    # The whole server admits 40 requests/s; every pair gets through without a rate-limit budget
    # of its own being spent, because the pool slows down instead.
    with LoopbackJudgeServer(rate_limit=40, burst=4) as server:
        judge = OpenAIJudge(
            server.base_url,
            server.model,
            api_key_env=api_key,
            concurrency=8,
            max_retries=0,
            backoff_base=0.05,
            backoff_max=1.0,
            rate_limit_patience=30,
            progress=False,
        )
        start = time.monotonic()
        judged = judge.judge([(f"p{i}", f"r{i} [[score=2]]") for i in range(40)])
        elapsed = time.monotonic() - start
    assert [j.score for j in judged] == [2.0] * 40
    assert server.rate_limited > 0 and judge.last_pacing.cuts > 0 and judge.last_pacing.limit < 8
    assert server.max_in_flight <= 8
    assert elapsed < 5


def test_rate_limit_without_retry_after_still_converges(api_key):
    with LoopbackJudgeServer(rate_limit=40, burst=4, retry_after_ms=False) as server:
        judge = OpenAIJudge(
            server.base_url,
            server.model,
            api_key_env=api_key,
            concurrency=8,
            max_retries=0,
            backoff_base=0.05,
            backoff_max=1.0,
            rate_limit_patience=30,
            progress=False,
        )
        judged = judge.judge([(f"p{i}", f"r{i}") for i in range(30)])
    assert all(j.score == 3.0 for j in judged) and server.rate_limited > 0


def test_retry_after_pauses_the_whole_pool(server, api_key):
    # Pair 0 is rate-limited with Retry-After 0.3 s; pairs 1-3 are in flight already. No pair
    # that had not started yet may start before the pause is over.
    pairs = [("limited", "[[429x1]] [[retry_after=0.3]]")] + [(f"p{i}", "[[delay=0.05]]") for i in range(1, 12)]
    judge = OpenAIJudge(server.base_url, server.model, api_key_env=api_key, concurrency=4, **FAST | {"backoff_max": 1})
    judged = judge.judge(pairs)
    assert all(j.scored for j in judged)
    limited_at = server.times[next(k for k in server.times if "User: limited\n" in k)][0]
    later = [t for k, ts in server.times.items() for t in ts if any(f"User: p{i}\n" in k for i in range(4, 12))]
    assert min(later) - limited_at >= 0.28


def test_pacer_halves_once_per_round_and_grows_back():
    pacer = Pacer(16)
    pacer.congested(0, rate_limited=True)
    assert pacer.limit == 8
    pacer.congested(0, rate_limited=True)  # a 429 from a request sent before the cut: no second cut
    assert pacer.limit == 8 and pacer.cuts == 1 and pacer.rate_limits == 2
    for round_ in range(1, 10):
        pacer.congested(round_)  # a timeout or 503
    assert pacer.limit == 1 and pacer.rate_limits == 2  # never below one request
    for _ in range(200):
        pacer.succeeded()
    assert pacer.limit == 16  # back to the ceiling, never above it


def test_retry_after_parsing():
    assert retry_after_seconds({"retry-after": "2"}) == 2.0
    assert retry_after_seconds({"retry-after": "0.25"}) == 0.25
    assert retry_after_seconds({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    future = time.time() + 30
    http_date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(future))
    assert 25 < retry_after_seconds({"retry-after": http_date}) <= 31
    for bad in ("soon", "", "nan", "inf", "Mon, 99 Foo 2024", "-"):
        assert retry_after_seconds({"retry-after": bad}) is None, bad
    assert retry_after_seconds({"retry-after-ms": "later"}) is None
    assert retry_after_seconds({"retry-after": "-5"}) == 0.0
    assert retry_after_seconds({}) is None and retry_after_seconds(None) is None
