"""The judgment cache: keys from everything that changes the answer, only scores are final."""

from __future__ import annotations

import math
import sqlite3
import threading

from safeproj.eval.judges import JudgeCache, Judgment, OpenAIJudge


def _judge(**kw) -> OpenAIJudge:
    return OpenAIJudge("http://127.0.0.1:1/v1", kw.pop("model", "judge-a"), progress=False, **kw)


def _key(judge: OpenAIJudge, prompt: str = "prompt", response: str = "response") -> str:
    return judge.cache_key([{"role": "user", "content": judge.template.render(prompt, response)}])


def test_key_covers_model_template_pair_and_sampling(tmp_path):
    base = _key(_judge())
    assert base == _key(_judge())  # stable
    assert base != _key(_judge(model="judge-b"))
    assert base != _key(_judge(template="qi2023"))
    assert base != _key(_judge(), response="response ")
    assert base != _key(_judge(temperature=None))
    assert base != _key(_judge(top_p=0.5)) != _key(_judge(max_tokens=64)) != _key(_judge(seed=1))
    assert base == _key(_judge(concurrency=3, timeout=5.0, cache_path=str(tmp_path / "x")))  # not the answer
    assert JudgeCache.key({"a": 1, "b": [2]}) == JudgeCache.key({"b": [2], "a": 1})


def test_nan_is_recorded_but_never_replaces_a_score(tmp_path):
    path = tmp_path / "c.sqlite"
    with JudgeCache(path) as cache:
        cache.put("k", Judgment(math.nan, "no valid score: no #thescore tag", "raw", "stop", failure="parse"), "m")
        nan = cache.get("k")
        assert math.isnan(nan.score) and nan.failure == "parse" and nan.cached and nan.reason.startswith("no valid")
        cache.put("k", Judgment(4.0, "r", "raw2", "stop"), "m", "paper@12345678")
        cache.put("k", Judgment(math.nan, "HTTP 500 after 6 attempts", failure="request"), "m")  # a later glitch
        hit = cache.get("k")
        assert (hit.score, hit.reason, hit.failure) == (4.0, "r", None)
        assert len(cache) == 1 and cache.count_final() == 1 and cache.get("missing") is None
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert sqlite3.connect(path).execute("SELECT rubric FROM judgments").fetchone()[0] == "paper@12345678"


def test_concurrent_writers_lose_nothing(tmp_path):
    path = tmp_path / "c.sqlite"
    JudgeCache(path).close()

    def write(worker: int) -> None:
        with JudgeCache(path) as cache:
            for i in range(40):
                cache.put(f"{worker}-{i}", Judgment(float(i % 5 + 1)), "m")

    threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with JudgeCache(path) as cache:
        assert len(cache) == 160 and cache.get("3-39").score == 5.0
