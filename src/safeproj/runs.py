"""Run-directory conventions: the names of the files a run leaves and how its records are read back."""

from __future__ import annotations

import json
import os
from pathlib import Path

SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.yaml"
POSTHOC_FILE = Path("posthoc") / "posthoc.json"
FORMAT = "safeproj.summary/1"
# Evaluator results without their prefix (post hoc rows hold `evaluate()` output as it comes).
UTILITY_NAMES = ("strict_acc", "flexible_acc")
HARM_NAMES = ("mean_score", "share_5", "refusal_rate", "unscored", "parse_failures", "n_scored")


def metric_name(key: str) -> str | None:
    """`utility/<name>` or `harm/<name>` for an evaluator result (prefixed or not), None for other keys."""
    if "/" in key:
        return key
    base = key.removesuffix("_ci_low").removesuffix("_ci_high")
    if base in UTILITY_NAMES:
        return f"utility/{key}"
    if base in HARM_NAMES:
        return f"harm/{key}"
    return None


RUN_MANIFEST = "safeproj.json"  # beside a finished run's Hugging Face checkpoint


def run_manifest(path: str | os.PathLike) -> dict:
    """The `safeproj.json` of a finished run's checkpoint directory."""
    file = Path(path) / RUN_MANIFEST
    if not file.is_file():
        raise ValueError(f"{path} is not a safeproj run checkpoint (no {RUN_MANIFEST})")
    return json.loads(file.read_text())


def _project_dir(name: str) -> Path:
    """`recipes/` or `configs/` of the source tree (SAFEPROJ_HOME overrides where it is)."""
    home = os.environ.get("SAFEPROJ_HOME")
    root = Path(home) if home else Path(__file__).resolve().parents[2]
    folder = root / name
    if not folder.is_dir():
        raise ValueError(f"no {name}/ folder at {root}: install safeproj from its source tree or set SAFEPROJ_HOME")
    return folder


def recipe_path(name: str) -> Path:
    """A file under the project's `recipes/`."""
    return _project_dir("recipes") / name


def config_path(name: str) -> Path:
    """A file under the project's `configs/`."""
    return _project_dir("configs") / name
