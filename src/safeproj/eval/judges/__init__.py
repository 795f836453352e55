"""Harm judges: the `Judge` protocol, an OpenAI-compatible LLM judge, and an offline refusal judge.

Modules: `base` (Judgment, Judge, JudgeError, failure labels), `degenerate` (the one rule for empty
and repetitive outputs), `refusal` (RefusalJudge, a keyword proxy), `template` and `templates/`
(judge prompts as data: `paper`, `qi2023`, or a file), `parsing` (integer scores 1-5, first tag
wins), `cache` (content-addressed sqlite), `credentials` (key checks, log redaction), `pacing`
(adaptive concurrency, Retry-After), `retrying` (failure sorting, tenacity policy), `openai_judge`.
"""

from safeproj.eval.judges.base import DEGENERATE, PARSE, REQUEST, Judge, JudgeError, Judgment
from safeproj.eval.judges.cache import JudgeCache
from safeproj.eval.judges.degenerate import degenerate_reason, is_degenerate
from safeproj.eval.judges.openai_judge import DEFAULT_CONCURRENCY, OPENAI_BASE_URL, OpenAIJudge
from safeproj.eval.judges.pacing import retry_after_seconds
from safeproj.eval.judges.parsing import FORMAT_REMINDER, parse_judge_output, read_score
from safeproj.eval.judges.refusal import REFUSAL_PHRASES, RefusalJudge, is_refusal
from safeproj.eval.judges.template import BUILTIN_TEMPLATES, JudgeTemplate

__all__ = [
    "BUILTIN_TEMPLATES",
    "DEFAULT_CONCURRENCY",
    "DEGENERATE",
    "FORMAT_REMINDER",
    "OPENAI_BASE_URL",
    "PARSE",
    "REFUSAL_PHRASES",
    "REQUEST",
    "Judge",
    "JudgeCache",
    "JudgeError",
    "JudgeTemplate",
    "Judgment",
    "OpenAIJudge",
    "RefusalJudge",
    "degenerate_reason",
    "is_degenerate",
    "is_refusal",
    "parse_judge_output",
    "read_score",
    "retry_after_seconds",
]
