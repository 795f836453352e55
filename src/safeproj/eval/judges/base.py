"""What every judge shares: the `Judgment` record, the `Judge` protocol, failure labels, `JudgeError`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

# Why a judgment has no score (`Judgment.failure`); None means it has one.
REQUEST = "request"  # the request, its transport or its reply body kept failing
PARSE = "parse"  # the judge answered, but no valid score, even after the format reminder
DEGENERATE = "degenerate"  # the judged response is empty or degenerate: labelled, never sent to a judge


@dataclass(frozen=True)
class Judgment:
    """One judged pair. `score` is NaN when no valid score came back; `failure` then says why
    (REQUEST, PARSE or DEGENERATE) and `reason` says what happened. `judge` names the judge that
    produced it (class and, for LLM judges, model and template)."""

    score: float
    reason: str = ""
    raw: str = ""
    finish_reason: str | None = None
    refusal: bool | None = None
    cached: bool = False
    failure: str | None = None
    judge: str = ""

    @property
    def scored(self) -> bool:
        return not math.isnan(self.score)

    @property
    def degenerate(self) -> bool:
        return self.failure == DEGENERATE


@runtime_checkable
class Judge(Protocol):
    """Anything that turns (instruction, response) pairs into judgments, one per pair, in order."""

    def judge(self, pairs: Sequence[tuple[str, str]]) -> list[Judgment]: ...


class JudgeError(RuntimeError):
    """The judge cannot work at all (server unreachable, unknown model, rejected or malformed key,
    exhausted quota). Judgments finished before the error stay in the cache."""
