"""One judge request: reading the reply, sorting failures, and the retry policy (tenacity).

Failures sort three ways:
  fatal     the judge cannot work at all: unknown model (404), key refused (401/403), quota
            exhausted (429 "insufficient_quota"). Raised as JudgeError; the run stops.
  final     a request the server rejects for this pair (other 4xx): not retried, the pair is NaN.
  transient everything else the client, the transport or the body can throw (429, 5xx, 408/409,
            timeouts, dropped connections, a 200 whose body is not a chat completion, any other
            exception): retried with jitter, then the pair is NaN with the reason.
Rate limits have their own budget: they are retried for up to `rate_limit_patience` seconds per
request (the pool slows down meanwhile, see pacing), other transient failures `max_retries` times.
The OpenAI SDK is imported inside the functions: importing it costs half a second, which users of
the refusal judge alone should not pay.
"""

from __future__ import annotations

import json
import logging
import random

from tenacity import RetryCallState, wait_random_exponential

from safeproj.eval.judges.base import JudgeError
from safeproj.eval.judges.credentials import redact
from safeproj.eval.judges.pacing import retry_after_seconds

log = logging.getLogger(__name__)

RETRY_AFTER_JITTER = 0.25  # a Retry-After wait is stretched by up to this share, so retries spread out


class BadReply(Exception):
    """A successful HTTP reply whose body is not a readable chat completion."""


def read_completion(body: str) -> tuple[str, str | None]:
    """(text, finish_reason) of a chat-completion body; BadReply for anything else (HTML, invalid
    JSON, {}, no choices). A null content is an empty answer, left to the score parser."""
    try:
        data = json.loads(body)
    except ValueError:
        raise BadReply(f"reply is not JSON: {' '.join(body[:40].split())!r}") from None
    if not isinstance(data, dict):
        raise BadReply(f"reply is a JSON {type(data).__name__}, not a chat completion")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        raise BadReply("reply has no choices")
    message = choices[0].get("message") if isinstance(choices[0], dict) else None
    if not isinstance(message, dict):
        raise BadReply("reply's first choice has no message")
    content = message.get("content")
    if content is not None and not isinstance(content, str):
        raise BadReply(f"reply's message content is a {type(content).__name__}, not text")
    finish_reason = choices[0].get("finish_reason")
    return content or "", finish_reason if isinstance(finish_reason, str) else None


def fatal_error(err: BaseException, model: str, base_url: str, api_key_env: str) -> JudgeError | None:
    """The JudgeError that `err` means for the whole run, or None if it concerns one request."""
    import openai

    if isinstance(err, openai.NotFoundError):
        return JudgeError(f"judge model {model!r} not found at {base_url} (HTTP 404)")
    if isinstance(err, (openai.AuthenticationError, openai.PermissionDeniedError)):
        return JudgeError(f"judge at {base_url} refused the key in {api_key_env} (HTTP {err.status_code})")
    if isinstance(err, openai.RateLimitError) and err.code == "insufficient_quota":
        return JudgeError(f"judge at {base_url}: the account behind {api_key_env} has no quota left (HTTP 429)")
    return None


def is_rate_limit(err: BaseException | None) -> bool:
    import openai

    return isinstance(err, openai.APIStatusError) and err.status_code == 429


def is_timeout(err: BaseException) -> bool:
    import openai

    return isinstance(err, openai.APITimeoutError)


def is_transient(err: BaseException) -> bool:
    """Worth another attempt: anything but a 4xx the server means (other than 408, 409, 429)."""
    import openai

    if isinstance(err, JudgeError):
        return False
    if isinstance(err, openai.APIStatusError):
        return err.status_code in (408, 409, 429) or err.status_code >= 500
    return True


def is_connect_failure(err: BaseException) -> bool:
    """No connection could be made at all (refused, unknown host), as opposed to one that broke."""
    import openai

    return (
        isinstance(err, openai.APIConnectionError)
        and not isinstance(err, openai.APITimeoutError)
        and (type(err.__cause__).__name__ in ("ConnectError", "ConnectTimeout"))
    )


def retry_after(err: BaseException | None) -> float | None:
    response = getattr(err, "response", None)
    return retry_after_seconds(getattr(response, "headers", None))


def describe(err: BaseException, timeout: float) -> str:
    """A short, key-free account of a failed request."""
    import openai

    if isinstance(err, openai.APIStatusError):
        text = f"HTTP {err.status_code} {type(err).__name__}"
    elif isinstance(err, openai.APITimeoutError):
        text = f"no reply within {timeout:g} s (APITimeoutError)"
    elif isinstance(err, openai.APIConnectionError):
        cause = type(err.__cause__).__name__ if err.__cause__ is not None else ""
        text = f"connection failed (APIConnectionError{': ' + cause if cause else ''})"
    elif isinstance(err, BadReply):
        text = str(err)
    else:  # an unknown exception's message may quote request headers: name its type only
        text = type(err).__name__
    return redact(text)


class RetryPolicy:
    """tenacity `stop` and `wait` for one request (make a new one per request: it counts failures).

    Args:
        max_retries: retries after failures other than rate limits.
        rate_limit_patience: seconds a request keeps retrying while rate-limited.
        backoff_base, backoff_max: exponential backoff with full jitter, uniform in
            [0, min(backoff_max, backoff_base * 2**(n - 1))] after attempt n; a Retry-After is honoured instead
            (capped by backoff_max, stretched by up to RETRY_AFTER_JITTER).
    """

    def __init__(self, max_retries: int, rate_limit_patience: float, backoff_base: float, backoff_max: float):
        self.max_retries = max_retries
        self.rate_limit_patience = rate_limit_patience
        self.backoff_max = backoff_max
        self.failures = 0
        self._backoff = wait_random_exponential(multiplier=backoff_base, max=backoff_max)

    def stop(self, state: RetryCallState) -> bool:
        err = state.outcome.exception() if state.outcome else None
        if is_rate_limit(err):
            return state.seconds_since_start >= self.rate_limit_patience
        self.failures += 1
        return self.failures > self.max_retries

    def wait(self, state: RetryCallState) -> float:
        err = state.outcome.exception() if state.outcome else None
        asked = retry_after(err)
        if asked is not None:
            return min(asked, self.backoff_max) * (1 + random.uniform(0, RETRY_AFTER_JITTER))
        return self._backoff(state)

    @staticmethod
    def before_sleep(state: RetryCallState) -> None:
        err = state.outcome.exception() if state.outcome else None
        log.debug(
            "judge request failed (%s); attempt %d, retry in %.3f s",
            type(err).__name__,
            state.attempt_number,
            state.upcoming_sleep,
        )
