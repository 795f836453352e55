"""`safeproj prereq`: make the safety-tuned version of a preset, the aligned model behind Δ_S.

For the embedded default there is no public "base vs aligned" pair, so the aligned model is the preset
safety-tuned on the built-in refusal data, and Δ_S = safety-tuned − preset. It is made by running
`recipes/safety_tune.yaml` itself (with `configs/model/tiny.yaml` on top for the tiny preset), once,
and cached where `safeproj.model.loading.safety_dir` says; there is no second copy of its settings.
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

from safeproj.model.loading import PRESETS, SAFETY_SUFFIX, PrerequisiteMissing, safety_dir, safety_tuned_dir
from safeproj.runs import SAFETY_PRESET_CONFIGS, SAFETY_RECIPE, config_path, recipe_path


def safety_tune_command(preset: str, seed: int = 0) -> Path:
    """The `fit` command line that safety-tunes `preset` into `target` (a run folder of its own)."""
    cmd = [sys.executable, "-m", "safeproj.cli", "fit", "--config", str(recipe_path(SAFETY_RECIPE))]
    if preset in SAFETY_PRESET_CONFIGS:
        cmd += ["--config", str(config_path(SAFETY_PRESET_CONFIGS[preset]))]
    return [*cmd, "--model.model", preset, "--seed_everything", str(seed)]


def ensure_safety_tuned(preset: str, seed: int = 0) -> Path:
    """The cached safety-tuned `preset`, made now by running the recipe if it is missing."""
    try:
        return safety_tuned_dir(preset)
    except PrerequisiteMissing:
        pass
    target = safety_dir(preset)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():  # another process made it while we waited
            return target
        work = target.parent / f".{target.name}-run-{os.getpid()}"
        cmd = [
            *safety_tune_command(preset, seed),
            "--model.checkpoint_dir",
            str(target),
            "--trainer.default_root_dir",
            str(work),
            "--trainer.logger",
            "false",
        ]
        print(f"Safety-tuning {preset} with {SAFETY_RECIPE} (once; cached in {target})", file=sys.stderr, flush=True)
        try:
            code = subprocess.call(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        finally:
            shutil.rmtree(work, ignore_errors=True)
        if code != 0 or not (target / "config.json").is_file():
            raise ValueError(
                f"safety-tuning {preset!r} failed (exit {code}); rerun `safeproj prereq {preset}` to see why"
            )
    return target


def presets_needed(config: Any) -> list[str]:
    """Presets whose safety-tuned version a config needs: `<preset>-safety` models, `safety:<preset>` specs."""
    found: list[str] = []

    def scan(value: Any) -> None:
        if isinstance(value, str):
            if value.startswith("safety:"):
                found.append(value.split(":", 1)[1])
            elif value.endswith(SAFETY_SUFFIX) and value.removesuffix(SAFETY_SUFFIX) in PRESETS:
                found.append(value.removesuffix(SAFETY_SUFFIX))
        elif isinstance(value, (list, tuple)):
            for v in value:
                scan(v)
        elif isinstance(value, dict):
            for v in value.values():
                scan(v)

    scan(config)
    # A bare `safety` subspace means Δ_S of the preset the run starts from.
    model = (config.get("model") or {}).get("model") if isinstance(config, dict) else None
    if isinstance(model, str) and _mentions(config, "safety"):
        found.append(model.removesuffix(SAFETY_SUFFIX))
    return list(dict.fromkeys(p for p in found if p in PRESETS))


def _mentions(value: Any, text: str) -> bool:
    if isinstance(value, str):
        return value == text
    if isinstance(value, (list, tuple)):
        return any(_mentions(v, text) for v in value)
    if isinstance(value, dict):
        return any(_mentions(v, text) for v in value.values())
    return False


def ensure_presets(presets: Iterable[str]) -> None:
    for preset in presets:
        ensure_safety_tuned(preset)


def prereq_command(preset: str, seed: int = 0) -> None:
    """Make the safety-tuned version of a preset (cached; a no-op when it exists).

    Args:
        preset: a preset name (tiny, smollm2-135m).
        seed: training seed.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    print(ensure_safety_tuned(preset, seed))
