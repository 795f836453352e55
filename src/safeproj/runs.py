"""Run-directory conventions: the names of the files a run leaves and how its records are read back."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from pathlib import Path

SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.yaml"
POSTHOC_FILE = Path("posthoc") / "posthoc.json"
FORMAT = "safeproj.summary/1"
# Evaluator results without their prefix (post hoc rows hold `evaluate()` output as it comes).
UTILITY_NAMES = (
    "strict_acc",
    "flexible_acc",
    "answer_nll",
    "answer_nll_start",
    "answer_nll_full",
    "answer_nll_retention",
    "n_tokens",
)
HARM_NAMES = (
    "mean_score",
    "share_5",
    "refusal_rate",
    "unscored",
    "parse_failures",
    "n_scored",
    "degenerate",
    "degenerate_rate",
    "nonrefusal_rate_keyword",
    "comply_margin",
    "comply_margin_start",
    "comply_margin_full",
    "comply_margin_retention",
    "comply_preference",
    "comply_preference_start",
    "comply_preference_full",
    "comply_preference_retention",
)


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


# The safety-tuned presets are made by this recipe, with a preset's config layered on it where it has one.
SAFETY_RECIPE = "safety_tune.yaml"
SAFETY_PRESET_CONFIGS = {"tiny": "model/tiny.yaml"}
# A hub model is safety-tuned by the same recipe at the paper's training settings on BeaverTails' safe answers
# (after the configs/model/ file that names the model, where there is one).
SAFETY_HUB_CONFIGS = ("trainer/paper.yaml", "data/paper-safety.yaml")

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


# A run's identity beside its files: name, group, recipe and W&B id, read back when a run resumes from a
# checkpoint under its directory, so it continues the same W&B run in the same directory.
RUN_INFO = "run.json"
RUNS_ROOT = Path("runs")


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=" else "-" for c in str(text)).strip("-")


def run_name(recipe: str, label: str | None, seed: int | None, stamp: str | None = None) -> str:
    """`<recipe>[-<label>]-s<seed>-<yymmdd-HHMMSS>-<4 hex>`: unique, so no two runs share a directory."""
    stamp = stamp or f"{time.strftime('%y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    parts = [recipe, label, f"s{seed}" if seed is not None else None, stamp]
    return "-".join(_slug(p) for p in parts if p)


def default_run_dir(recipe: str, name: str) -> Path:
    """`runs/<recipe>/<run-name>`, relative to the working directory."""
    return RUNS_ROOT / _slug(recipe) / name


def write_run_info(run_dir: str | os.PathLike, info: dict) -> Path:
    file = Path(run_dir) / RUN_INFO
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(info, indent=2))
    return file


def find_run_info(path: str | os.PathLike) -> tuple[Path, dict] | None:
    """(run directory, its run.json) of the nearest folder holding `path` that has one, None if none does."""
    for folder in [Path(path).resolve(), *Path(path).resolve().parents]:
        file = folder / RUN_INFO
        if file.is_file():
            return folder, json.loads(file.read_text())
    return None


def content_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, or of a directory's relative file names and contents in sorted order."""
    path = Path(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if file != path:
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
