"""Pacing one judging run against a server that may rate-limit it or fall behind.

`Pacer` is shared by every request of a run. It caps the requests in flight at an adaptive limit
(additive increase, multiplicative decrease, as TCP does with its window): each success raises the
limit by 1/limit (about one more request per round trip) up to the configured concurrency; a sign
of congestion halves it, once per round of requests, never below 1. Congestion is a rate limit
(HTTP 429), an overloaded server (503) or a request that timed out (a slow server with a queue
longer than the timeout). A server's Retry-After also pauses the whole pool, not only the request
that got it, so a sustained limit costs time, not answers, and retries do not come back in lockstep.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

RESUME_SPREAD = 0.1  # after a shared pause each request waits up to this share longer, so they do not restart at once


def retry_after_seconds(headers) -> float | None:
    """Seconds asked for by retry-after-ms, or Retry-After (seconds or an HTTP date); None when
    absent or unparsable (a bad header is ignored, never an error)."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            value = float(ms) / 1000
            if math.isfinite(value):
                return max(0.0, value)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        seconds = float(value)
        return max(0.0, seconds) if math.isfinite(seconds) else None
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None or when.tzinfo is None:  # RFC 9110 dates are GMT; a date without a zone is unusable
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass(frozen=True)
class PacingStats:
    """What a run's pacing did: plain numbers, for reports and tests."""

    max_in_flight: int
    limit: float
    cuts: int
    rate_limits: int
    replies: int


class Pacer:
    """Admission control for one run: `async with pacer.turn() as ticket:` around each request.

    Args:
        ceiling: most requests in flight at once (the configured concurrency); also the starting limit.
    """

    def __init__(self, ceiling: int):
        if ceiling < 1:
            raise ValueError(f"ceiling must be >= 1, got {ceiling}")
        self.ceiling = ceiling
        self.limit = float(ceiling)
        self.in_flight = 0
        self.max_in_flight = 0
        self.replies = 0  # any HTTP reply: the server is reachable
        self.rate_limits = 0
        self.cuts = 0
        self._resume_at = 0.0
        self._round = 0  # bumped at each cut; a 429 from an earlier round does not cut again
        self._changed = asyncio.Condition()

    @asynccontextmanager
    async def turn(self) -> AsyncIterator[int]:
        """Wait for the shared pause to end and a free slot; yields the round the request belongs to."""
        while True:
            pause = self._resume_at - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause * (1 + random.uniform(0, RESUME_SPREAD)))
                continue
            if self.in_flight < int(self.limit):
                break
            async with self._changed:
                await self._changed.wait()
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            yield self._round
        finally:
            self.in_flight -= 1
            async with self._changed:
                self._changed.notify_all()

    def stats(self) -> PacingStats:
        return PacingStats(self.max_in_flight, self.limit, self.cuts, self.rate_limits, self.replies)

    def succeeded(self) -> None:
        self.replies += 1
        self.limit = min(float(self.ceiling), self.limit + 1.0 / self.limit)

    def replied(self) -> None:
        """An HTTP error reply: not a success, but it shows the server is there."""
        self.replies += 1

    def congested(self, round_: int, pause: float | None = None, rate_limited: bool = False) -> None:
        """A 429, 503 or timeout for a request of `round_`: halve the limit once per round; pause
        everyone for `pause` s (the server's Retry-After) if given."""
        if rate_limited:
            self.rate_limits += 1
        if pause:
            self._resume_at = max(self._resume_at, time.monotonic() + pause)
        if round_ == self._round:
            self.limit = max(1.0, self.limit / 2)
            self._round += 1
            self.cuts += 1
