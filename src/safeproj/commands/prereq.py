"""`safeproj prereq`: make the safety-tuned version of a model, the aligned model behind Δ_S.

Δ_S = safety-tuned − the model. For the embedded presets the safety data is the built-in refusal corpus
(there is no public "base vs aligned" pair for them); a hub model `org/name[@revision]` is safety-tuned at
the paper's settings on BeaverTails' safe answers (`safeproj.runs.SAFETY_HUB_CONFIGS`). Either way it is
made by running `recipes/safety_tune.yaml` itself with the configs `safeproj.model.loading.safety_configs`
names layered on it, once, and cached where `safeproj.model.loading.safety_dir` says (a content
fingerprint of those files and, for a hub model, of its snapshot); there is no second copy of its settings.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from filelock import FileLock

from safeproj.model.hub import checkpoint_dir, is_hub_name
from safeproj.model.loading import (
    PRESETS,
    SAFETY_SUFFIX,
    PrerequisiteMissing,
    can_safety_tune,
    safety_configs,
    safety_dir,
    safety_tuned_dir,
)
from safeproj.model.subspaces import alignment_pair
from safeproj.runs import SAFETY_RECIPE, config_path, recipe_path


def safety_tune_command(model: str, seed: int = 0) -> list[str]:
    """The `fit` command line that safety-tunes `model` (a preset or hub name)."""
    cmd = [sys.executable, "-m", "safeproj.cli", "fit", "--config", str(recipe_path(SAFETY_RECIPE))]
    for name in safety_configs(model):
        cmd += ["--config", str(config_path(name))]
    return [*cmd, "--model.model", model, "--seed_everything", str(seed)]


def ensure_safety_tuned(model: str, seed: int = 0) -> Path:
    """The cached safety-tuned `model`, made now by running the recipe if it is missing."""
    if is_hub_name(model):
        checkpoint_dir(model)  # fetched first: the cache folder's fingerprint names the snapshot it starts from
    try:
        return safety_tuned_dir(model)
    except PrerequisiteMissing:
        pass
    target = safety_dir(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():  # another process made it while we waited
            return target
        work = target.parent / f".{target.name}-run-{os.getpid()}"
        cmd = [
            *safety_tune_command(model, seed),
            "--model.checkpoint_dir",
            str(target),
            "--trainer.default_root_dir",
            str(work),
            "--trainer.logger",
            "false",
        ]
        print(f"Safety-tuning {model} with {SAFETY_RECIPE} (once; cached in {target})", file=sys.stderr, flush=True)
        try:
            code = subprocess.call(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        finally:
            shutil.rmtree(work, ignore_errors=True)
        if code != 0 or not (target / "config.json").is_file():
            raise ValueError(
                f"safety-tuning {model!r} failed (exit {code}); rerun `safeproj prereq {model}` to see why"
            )
    return target


def safety_models_needed(config: Any) -> list[str]:
    """Models whose safety-tuned version a config needs: `<preset>-safety` models, `safety:<model>` specs, and
    the start model of a run with a bare `safety` subspace (presets and hub names; others are left to the checks)."""
    found: list[str] = []

    def scan(value: Any) -> None:
        if isinstance(value, str):
            if value.startswith("safety:"):
                found.append(value.split(":", 1)[1])
            for part in _checkpoints_named(value):
                if part.endswith(SAFETY_SUFFIX) and part.removesuffix(SAFETY_SUFFIX) in PRESETS:
                    found.append(part.removesuffix(SAFETY_SUFFIX))
        elif isinstance(value, (list, tuple)):
            for v in value:
                scan(v)
        elif isinstance(value, dict):
            for v in value.values():
                scan(v)

    scan(config)
    # A bare `safety` subspace means Δ_S of the model the run starts from.
    model = (config.get("model") or {}).get("model") if isinstance(config, dict) else None
    if isinstance(model, str) and _mentions(config, "safety"):
        found.append(model.removesuffix(SAFETY_SUFFIX) if model.removesuffix(SAFETY_SUFFIX) in PRESETS else model)
    return list(dict.fromkeys(m for m in found if can_safety_tune(m)))


def _checkpoints_named(value: str) -> list[str]:
    """The checkpoints a string names: itself, both sides of `TUNED,BASE`, or the pair of `alignment:<preset>`."""
    if value.startswith("alignment:"):
        try:
            return list(alignment_pair(value.split(":", 1)[1]))
        except ValueError:
            return []  # an unknown preset is the checks' to report
    return [part.strip() for part in value.split(",")]


def _mentions(value: Any, text: str) -> bool:
    if isinstance(value, str):
        return value == text
    if isinstance(value, (list, tuple)):
        return any(_mentions(v, text) for v in value)
    if isinstance(value, dict):
        return any(_mentions(v, text) for v in value.values())
    return False


def ensure_safety_models(models: Iterable[str]) -> None:
    for model in models:
        ensure_safety_tuned(model)


def prereq_command(model: str, seed: int = 0) -> None:
    """Make the safety-tuned version of a preset or hub model (cached; a no-op when it exists).

    Args:
        model: a preset name (tiny, smollm2-135m) or a hub model `org/name[@revision]`.
        seed: training seed.
    """
    if not can_safety_tune(model):
        raise ValueError(
            f"cannot safety-tune {model!r}: give a preset ({', '.join(PRESETS)}) or a hub name 'org/name[@revision]'"
        )
    print(ensure_safety_tuned(model, seed))
