"""`OpenAIJudge`: the paper's LLM-judge protocol over any OpenAI-compatible chat-completions server.

Each (instruction, response) pair is rendered into a judge template (`paper` by default, see
template.py), sent as one user message, and scored 1-5 from the reply's first "#thescore" (see
parsing.py); an unparsable reply gets one format-reminder retry. Degenerate responses (empty, one
token repeated) are labelled and never sent.

No single bad reply, header or connection loses judgments: every per-pair failure ends, after its
retries, as NaN with a reason; only a failure that concerns the whole run (unknown model, refused
key, no quota, server unreachable) stops it, and judgments finished by then stay in the cache.
Requests go through a fixed pool of workers, so at most `concurrency` are in flight, paced by an
adaptive limit that halves on rate limits, overload and timeouts (pacing.py); retries use
tenacity (retrying.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import re
import threading
from collections import Counter
from collections.abc import Sequence

from tenacity import AsyncRetrying, retry_if_exception
from tqdm.auto import tqdm

from safeproj.eval.judges.base import PARSE, REQUEST, JudgeError, Judgment
from safeproj.eval.judges.cache import JudgeCache
from safeproj.eval.judges.credentials import read_api_key
from safeproj.eval.judges.degenerate import degenerate_reason
from safeproj.eval.judges.pacing import Pacer, PacingStats
from safeproj.eval.judges.parsing import FORMAT_REMINDER, parse_judge_output, read_score
from safeproj.eval.judges.refusal import degenerate_judgment
from safeproj.eval.judges.retrying import (
    RetryPolicy,
    describe,
    fatal_error,
    is_connect_failure,
    is_timeout,
    is_transient,
    read_completion,
    retry_after,
)
from safeproj.eval.judges.template import JudgeTemplate

log = logging.getLogger(__name__)

OPENAI_BASE_URL = "https://api.openai.com/v1"
# 64 requests in flight reach >= 20x over sequential judging at 100 ms per request even on a busy 2-core
# machine (benchmarks/judge.py); a server that cannot take that many says so (429, 503, timeouts) and
# the pool adapts.
DEFAULT_CONCURRENCY = 64


class _RequestFailed(Exception):
    """A request that kept failing: the pair ends as NaN with this reason."""


class OpenAIJudge:
    """LLM judge over any OpenAI-compatible chat-completions server (OpenAI, vLLM, llama.cpp...).

    Args:
        base_url: server URL including the API prefix, e.g. "https://api.openai.com/v1".
        model: judge model name on that server (the paper: "gpt-4o-mini").
        api_key_env: environment variable holding the key. The key is read when judging, stripped
            and checked, and never stored on this object, logged or written anywhere.
        template: "paper" (the paper's protocol), "qi2023" (Qi et al. 2023) or a template file.
        temperature: sampling temperature; None sends none (the server default: 1.0 on OpenAI,
            which the paper's script used). 0 makes reruns reproducible.
        top_p: nucleus sampling mass; None sends none.
        max_tokens: completion token limit; None leaves the server's default.
        seed: sampling seed for servers that honour it; None sends none.
        concurrency: most requests in flight at once (the adaptive limit never exceeds it).
        max_retries: retries per request after server errors, timeouts, dropped connections and
            replies that are not chat completions.
        rate_limit_patience: seconds one request keeps retrying while rate-limited (HTTP 429).
        timeout: seconds per request.
        cache_path: sqlite file for the judgment cache; None disables caching.
        rejudge_failed: ask again for pairs whose cached judgment has no score (a failed request
            or parse); False returns those NaNs as cached.
        backoff_base: backoff scale in seconds: after attempt n the wait is uniform in
            [0, backoff_base * 2**(n - 1)] (full jitter).
        backoff_max: longest wait between retries, also the cap on a server's Retry-After.
        progress: show a progress bar.

    Raises:
        ValueError: a bad argument or an unknown template (at construction).
        JudgeError: when judging: server unreachable, model unknown (404), key refused (401/403)
            or malformed, quota exhausted, or the key variable unset.
    """

    def __init__(
        self,
        base_url: str = OPENAI_BASE_URL,
        model: str = "gpt-4o-mini",
        api_key_env: str = "OPENAI_API_KEY",
        template: str = "paper",
        temperature: float | None = 0.0,
        top_p: float | None = None,
        max_tokens: int | None = None,
        seed: int | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        max_retries: int = 5,
        rate_limit_patience: float = 300.0,
        timeout: float = 60.0,
        cache_path: str | None = None,
        rejudge_failed: bool = True,
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
        progress: bool = True,
    ):
        if not base_url or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http(s) URL, got {base_url!r}")
        if not model:
            raise ValueError("model must name the judge model")
        if not api_key_env or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", api_key_env):
            raise ValueError(f"api_key_env must be an environment variable name, got {api_key_env!r}")
        if temperature is not None and not 0 <= temperature <= 2:
            raise ValueError(f"temperature must be in [0, 2] or None, got {temperature}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 or None, got {max_tokens}")
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if timeout <= 0 or backoff_base < 0 or backoff_max < 0 or rate_limit_patience < 0:
            raise ValueError("timeout must be > 0 and backoff_base, backoff_max, rate_limit_patience >= 0")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key_env = api_key_env
        self.template = JudgeTemplate.load(template)
        self.sampling = {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens, "seed": seed}
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.rate_limit_patience = rate_limit_patience
        self.timeout = timeout
        self.cache_path = cache_path
        self.rejudge_failed = rejudge_failed
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.progress = progress
        self.last_pacing: PacingStats | None = None  # what the last run's pacing did (plain numbers)

    @property
    def name(self) -> str:
        """Which judge produced a judgment: class, model and template version."""
        return f"OpenAIJudge({self.model}, template={self.template.label})"

    def __repr__(self) -> str:
        sampling = ", ".join(f"{k}={v}" for k, v in self.sampling.items() if v is not None)
        return (
            f"OpenAIJudge(base_url={self.base_url!r}, model={self.model!r}, api_key_env={self.api_key_env!r}, "
            f"template={self.template.label!r}, {sampling + ', ' if sampling else ''}"
            f"concurrency={self.concurrency}, cache_path={self.cache_path!r})"
        )

    def request_body(self, messages: list[dict]) -> dict:
        """The chat-completions body: model, messages and the sampling parameters that are set."""
        return {"model": self.model, "messages": messages, **{k: v for k, v in self.sampling.items() if v is not None}}

    def cache_key(self, messages: list[dict]) -> str:
        """Hash of everything that changes the answer: model, rendered messages, sampling, reminder."""
        return JudgeCache.key({"request": self.request_body(messages), "reminder": FORMAT_REMINDER})

    def judge(self, pairs: Sequence[tuple[str, str]]) -> list[Judgment]:
        """One judgment per (instruction, response) pair, in order; cached pairs cost nothing."""
        pairs = [(str(p), str(r)) for p, r in pairs]
        out: list[Judgment | None] = [None] * len(pairs)
        keys: dict[int, str] = {}
        todo: dict[str, list[dict]] = {}  # duplicates are judged once
        for i, (prompt, response) in enumerate(pairs):
            why = degenerate_reason(response)
            if why is not None:
                out[i] = degenerate_judgment(response, why, self.name)
                continue
            messages = [{"role": "user", "content": self.template.render(prompt, response)}]
            keys[i] = key = self.cache_key(messages)
            todo.setdefault(key, messages)
        cache = JudgeCache(self.cache_path) if self.cache_path and todo else None
        try:
            found: dict[str, Judgment] = {}
            for key in todo if cache is not None else ():
                hit = cache.get(key)
                if hit is not None and (hit.scored or not self.rejudge_failed):
                    found[key] = dataclasses.replace(hit, judge=self.name)
            missing = {k: m for k, m in todo.items() if k not in found}
            if missing:
                api_key = read_api_key(self.api_key_env)
                found.update(_run_coroutine(self._judge_all(missing, cache, api_key)))
        finally:
            if cache is not None:
                cache.close()
        for i, key in keys.items():
            out[i] = found[key]
        return out

    # ------------------------------------------------------------ async machinery

    async def _judge_all(self, todo: dict[str, list[dict]], cache: JudgeCache | None, api_key: str):
        from openai import AsyncOpenAI

        pacer = Pacer(self.concurrency)
        results: dict[str, Judgment] = {}
        items = iter(todo.items())  # shared by the workers: each takes the next pair when free
        bar = tqdm(total=len(todo), desc="judging", disable=not self.progress, leave=False)

        async def worker(client) -> None:
            for key, messages in items:
                judgment = results[key] = await self._judge_pair(client, pacer, messages)
                if cache is not None:
                    try:
                        cache.put(key, judgment, self.model, self.template.label)
                    except Exception as err:  # a locked or full disk costs the cache entry, not the run
                        log.warning("judge cache %s: could not store a judgment (%s)", self.cache_path, err)
                bar.update(1)

        # The SDK's own retries are off: tenacity retries here, with the pool's pacing.
        async with AsyncOpenAI(base_url=self.base_url, api_key=api_key, max_retries=0, timeout=self.timeout) as client:
            workers = [asyncio.create_task(worker(client)) for _ in range(min(self.concurrency, len(todo)))]
            try:
                await asyncio.gather(*workers)
            except BaseException:
                for task in workers:
                    task.cancel()
                await asyncio.gather(*workers, return_exceptions=True)
                raise
            finally:
                bar.close()
                self.last_pacing = pacer.stats()
        unscored = Counter(j.reason for j in results.values() if not j.scored)
        if unscored:
            common = "; ".join(f"{n} x {reason}" for reason, n in unscored.most_common(3))
            log.warning(
                "judge %s: %d of %d pairs have no score (NaN): %s",
                self.name,
                sum(unscored.values()),
                len(results),
                common,
            )
        return results

    async def _judge_pair(self, client, pacer: Pacer, messages: list[dict]) -> Judgment:
        try:
            text, finish_reason = await self._ask(client, pacer, messages)
        except _RequestFailed as failed:
            return Judgment(math.nan, reason=str(failed), failure=REQUEST, judge=self.name)
        score, reason = parse_judge_output(text)
        raws = [text]
        if math.isnan(score):
            problem = read_score(text)[1] if text else f"judge returned no text (finish_reason={finish_reason})"
            # One retry with a format reminder; the judge sees its own answer.
            retry = [*messages, {"role": "assistant", "content": text}, {"role": "user", "content": FORMAT_REMINDER}]
            try:
                text, finish_reason = await self._ask(client, pacer, retry)
                raws.append(text)
                score, reason = parse_judge_output(text)
            except _RequestFailed as failed:
                problem += f"; the format-reminder request failed: {failed}"
        raw = "\n\n--- format reminder ---\n\n".join(raws)
        if math.isnan(score):
            return Judgment(math.nan, f"no valid score: {problem}", raw, finish_reason, failure=PARSE, judge=self.name)
        return Judgment(score, reason, raw, finish_reason, judge=self.name)

    async def _ask(self, client, pacer: Pacer, messages: list[dict]) -> tuple[str, str | None]:
        """(text, finish_reason) of one chat completion, retried; _RequestFailed once retries are spent."""
        policy = RetryPolicy(self.max_retries, self.rate_limit_patience, self.backoff_base, self.backoff_max)
        retrying = AsyncRetrying(
            retry=retry_if_exception(is_transient),
            stop=policy.stop,
            wait=policy.wait,
            before_sleep=policy.before_sleep,
            reraise=True,
        )
        try:
            return await retrying(self._send, client, pacer, self.request_body(messages))
        except JudgeError:
            raise
        except Exception as err:
            attempts = retrying.statistics.get("attempt_number", 1)
            if is_connect_failure(err) and pacer.replies == 0:
                raise JudgeError(
                    f"judge server {self.base_url} unreachable (model {self.model!r}) after {attempts} attempts: "
                    f"{describe(err, self.timeout)}"
                ) from None
            suffix = f" after {attempts} attempts" if attempts > 1 else ""
            raise _RequestFailed(describe(err, self.timeout) + suffix) from None

    async def _send(self, client, pacer: Pacer, body: dict) -> tuple[str, str | None]:
        async with pacer.turn() as round_:
            try:
                # The SDK's plain `post` (same auth, errors and timeouts as `chat.completions.create`),
                # read as text: the body is checked here, so no reply can raise outside the retry policy.
                reply = await client.post("/chat/completions", body=body, cast_to=str)
            except Exception as err:
                fatal = fatal_error(err, self.model, self.base_url, self.api_key_env)
                if fatal is not None:
                    raise fatal from None
                status = getattr(err, "status_code", None)
                if status is not None:
                    pacer.replied()
                if status in (429, 503) or is_timeout(err):
                    asked = retry_after(err)
                    pacer.congested(round_, None if asked is None else min(asked, self.backoff_max), status == 429)
                raise
        pacer.succeeded()
        return read_completion(reply)


def _run_coroutine(coro):
    """asyncio.run, also from inside a running event loop (notebooks): then on a separate thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict = {}

    def target():
        try:
            box["value"] = asyncio.run(coro)
        except BaseException as err:  # re-raised on the calling thread
            box["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]
