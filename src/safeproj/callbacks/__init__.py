"""Lightning callbacks, one per module; each class is importable from here (`safeproj.callbacks.UtilityEval`).

`OnlineProjection` projects updates during training, `PosthocProjection` projects the final update
into variants and scores each, `SafeLoRA` is the SafeLoRA baseline, `SubspaceDrift` and
`OverlapCallback` measure how the update relates to a subspace, `ActivationRecorder` records hidden
states, `UtilityEval`/`HarmEval` evaluate by generation, `UtilityLikelihoodEval`/`HarmLikelihoodEval` by
teacher-forced likelihood, `NonFiniteGuard` ends a run whose loss, gradients or
weights stop being finite, and `RunSummary` writes the run's summary.json.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ActivationRecorder": "activation_recorder",
    "HarmEval": "harm_eval",
    "HarmLikelihoodEval": "harm_likelihood",
    "NonFiniteGuard": "nonfinite_guard",
    "OnlineProjection": "online_projection",
    "OverlapCallback": "overlap",
    "PosthocProjection": "posthoc_projection",
    "ProgressLog": "progress",
    "RunSummary": "summary",
    "SafeLoRA": "safelora",
    "SubspaceDrift": "drift",
    "UtilityEval": "utility_eval",
    "UtilityLikelihoodEval": "utility_likelihood",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    # Lazy, so importing one callback does not import every other one (and torch-heavy modules with it).
    if name not in _EXPORTS:
        raise AttributeError(f"module 'safeproj.callbacks' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"safeproj.callbacks.{_EXPORTS[name]}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
