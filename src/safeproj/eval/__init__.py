"""Evaluation: batched generation, GSM8k utility, judged harm, bootstrap statistics.

Modules: `generation` (greedy batched generation), `gsm8k` (extraction, accuracy), `harm`
(harmful prompts, harm metric), `judges` (Judge protocol, OpenAIJudge, RefusalJudge, JudgeCache),
`likelihood` (teacher-forced log-likelihood of continuations), `metrics` (answer NLL, comply margin),
`stats` (bootstrap CIs, nested bootstrap effect sizes), `command` (`safeproj eval`).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "generate": "generation",
    "evaluate_gsm8k": "gsm8k",
    "GSM8kAccuracy": "gsm8k",
    "evaluate_harm": "harm",
    "HarmMetric": "harm",
    "continuation_logprobs": "likelihood",
    "AnswerNLL": "metrics",
    "ComplyMargin": "metrics",
    "evaluate_answer_nll": "metrics",
    "evaluate_comply_margin": "metrics",
    "Judge": "judges",
    "Judgment": "judges",
    "JudgeCache": "judges",
    "JudgeError": "judges",
    "OpenAIJudge": "judges",
    "RefusalJudge": "judges",
    "bootstrap_ci": "stats",
    "nested_bootstrap": "stats",
    "paired_effect": "stats",
    "retention_effect": "stats",
    "eval_command": "command",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    # Lazy, so importing one submodule (say the judges) does not pull in torch and transformers.
    if name not in _EXPORTS:
        raise AttributeError(f"module 'safeproj.eval' has no attribute {name!r}")
    return getattr(importlib.import_module(f"safeproj.eval.{_EXPORTS[name]}"), name)
