"""Reading finished runs back for a report: summaries (from folders, files or a sweep's index), their
grouping into cells, and the overlap (MSO) outputs of after-steps."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safeproj.commands.sweep.spec import AFTER_FILE, DEFAULT_SEED_KEYS
from safeproj.io import plain_float
from safeproj.runs import SUMMARY_FILE, metric_name

# Keys of a run's config that differ between seeds or machines, not between cells.
VOLATILE_CONFIG = (
    ("seed_everything",),
    ("ckpt_path",),
    ("config",),
    ("trainer", "default_root_dir"),
    ("model", "checkpoint_dir"),
)
VOLATILE_LOGGER_ARGS = ("save_dir", "name", "version", "tags", "group", "id", "dir", "experiment", "resume")
ROW_META = ("variant", "selection", "frac", "keep", "energy_kept")


@dataclass
class Run:
    """A finished run: its summary, the cell it belongs to and its metrics under `utility/`/`harm/` names."""

    dir: Path
    source: str  # the input folder or index it was found through (named in errors)
    summary: dict[str, Any]
    cell: str = ""
    key: str = ""
    seed: int | None = None
    recipe: str = "?"
    metrics: dict[str, float | None] = field(default_factory=dict)
    posthoc: list[dict[str, Any]] = field(default_factory=list)
    seed_keys: list[str] = field(default_factory=list)

    @property
    def config(self) -> dict[str, Any]:
        return self.summary.get("config") or {}


@dataclass
class MsoResult:
    """The MSO rows of one overlap output, labelled by its after-step (or folder) and seed."""

    label: str
    seed: int | None
    dir: Path
    rows: list[dict[str, Any]]


def read_json(path: Path) -> Any:
    """A JSON file's content; an unreadable file is a one-line ValueError naming it."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: unreadable JSON ({' '.join(str(err).split())})") from None


def _summary_files(path: Path) -> list[Path]:
    if path.is_file() and path.suffix == ".jsonl":
        files = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise ValueError(f"{path}:{number}: not a JSON line") from None
            if record.get("kind", "run") == "run" and "dir" in record:
                files.append(path.parent / record["dir"] / SUMMARY_FILE)
        return [f for f in files if f.is_file()]
    if path.is_file() and path.name == SUMMARY_FILE:
        return [path]
    if path.is_dir():
        return sorted(path.rglob(SUMMARY_FILE))
    raise ValueError(f"{path}: expected a run folder, a {SUMMARY_FILE} or an index.jsonl")


def load_runs(paths: Sequence[str | os.PathLike]) -> list[Run]:
    """Every finished run under `paths`, once each.

    Raises:
        ValueError: no paths, a path that does not exist, or one that holds neither a finished run's
            summary.json nor overlap outputs (named).
    """
    if not paths:
        raise ValueError("runs is empty: give at least one run folder or index.jsonl")
    runs: dict[Path, Run] = {}
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise ValueError(f"{path}: no such file or folder")
        found = 0
        for file in _summary_files(path):
            summary = read_json(file)
            if not isinstance(summary, dict) or summary.get("status") != "done":
                continue
            found += 1
            runs.setdefault(file.parent.resolve(), _make_run(file.parent, path, summary))
        if not found and not (path.is_dir() and any(path.rglob("mso.json"))):
            raise ValueError(f"{path}: no {SUMMARY_FILE} of a finished run (and no overlap output) in this folder")
    return list(runs.values())


def _make_run(directory: Path, source: Path, summary: dict[str, Any]) -> Run:
    run = Run(dir=directory, source=str(source), summary=summary)
    labels = summary.get("labels") or {}
    config = run.config
    logger_args = (config.get("trainer") or {}).get("logger") or {}
    logger_args = logger_args.get("init_args") or {} if isinstance(logger_args, dict) else {}
    run.recipe = str(labels.get("recipe") or logger_args.get("group") or "?")
    seed = labels.get("seed", config.get("seed_everything"))
    run.seed = seed if isinstance(seed, int) and not isinstance(seed, bool) else None
    run.metrics = {}
    for key, value in (summary.get("metrics") or {}).items():
        name = metric_name(key) or key
        run.metrics[name] = plain_float(value)
    run.posthoc = [normalize_row(row) for row in summary.get("posthoc") or []]
    # Runs from outside a sweep take its default: seed_everything and data.seed vary with the seed.
    run.seed_keys = [k for k in str(labels.get("seed_keys") or ",".join(DEFAULT_SEED_KEYS)).split(",") if k]
    # The recipe is part of a cell's identity even where two recipes resolve to the same config.
    identity = {"recipe": run.recipe, "config": cell_config(config, run.seed_keys)}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:8]
    run.key = digest if config else f"dir:{directory}"
    if labels.get("cell"):
        run.cell = str(labels["cell"])
    elif config:
        run.cell = f"{run.recipe}-{digest}"
    else:
        root = source if source.is_dir() else source.parent
        run.cell = os.path.relpath(directory, root) if directory != root else directory.name
    return run


def normalize_row(row: dict[str, Any]) -> dict[str, Any]:
    """A post hoc row with its evaluator results under `utility/` and `harm/` names."""
    out = {k: row.get(k) for k in ROW_META}
    for key, value in row.items():
        name = metric_name(key)
        if name is not None:
            out[name] = plain_float(value)
    return out


def cell_config(config: dict[str, Any], seed_keys: Sequence[str] = ()) -> dict[str, Any]:
    """The config minus what differs between seeds of one cell (seed, paths, run names, labels)."""
    config = json.loads(json.dumps(config, default=str))
    callbacks = (config.get("trainer") or {}).get("callbacks")
    for key in seed_keys:
        # `Class.arg` names a callback's argument (as in a sweep's seed_keys): drop it from that callback.
        owner, _, arg = key.partition(".")
        if owner[:1].isupper() and isinstance(callbacks, list):
            for cb in callbacks:
                if isinstance(cb, dict) and str(cb.get("class_path", "")).rsplit(".", 1)[-1] == owner:
                    (cb.get("init_args") or {}).pop(arg, None)
    for path in (*VOLATILE_CONFIG, *(tuple(k.split(".")) for k in seed_keys)):
        node = config
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(path[-1], None)
    trainer = config.get("trainer") or {}
    logger = trainer.get("logger")
    if isinstance(logger, dict) and isinstance(logger.get("init_args"), dict):
        for key in VOLATILE_LOGGER_ARGS:
            logger["init_args"].pop(key, None)
    if isinstance(trainer.get("callbacks"), list):
        trainer["callbacks"] = [
            cb
            for cb in trainer["callbacks"]
            if not (isinstance(cb, dict) and str(cb.get("class_path", "")).endswith("RunSummary"))
        ]
    return config


def group_cells(runs: Sequence[Run]) -> dict[str, list[Run]]:
    """Runs by cell label, in first-seen order; a label whose runs have different configs is an error."""
    cells: dict[str, list[Run]] = {}
    for run in runs:
        cells.setdefault(run.cell, []).append(run)
    for label, members in cells.items():
        keys = {r.key for r in members}
        if len(keys) > 1:
            first = members[0]
            other = next(r for r in members if r.key != first.key)
            recipes = sorted({r.recipe for r in members})
            what = f"recipes {', '.join(recipes)}" if len(recipes) > 1 else "different configs"
            raise ValueError(
                f"{other.source}: cell {label!r} mixes runs with {what} ({first.dir} and {other.dir}); "
                "report them from separate folders"
            )
    return cells


def load_mso(paths: Sequence[str | os.PathLike]) -> list[MsoResult]:
    """Overlap outputs (`mso.json`, with the sweep's `after.json` beside it when there is one)."""
    results, seen = [], set()
    for raw in paths:
        path = Path(raw)
        root = path.parent if path.is_file() else path
        for file in sorted(root.rglob("mso.json")) if root.is_dir() else []:
            if file.resolve() in seen:
                continue
            seen.add(file.resolve())
            rows = read_json(file)
            if not isinstance(rows, list):
                raise ValueError(f"{file}: expected a list of MSO rows")
            after = file.parent / AFTER_FILE
            meta = read_json(after) if after.is_file() else {}
            seed = meta.get("seed")
            if seed is None:
                match = re.fullmatch(r"seed(\d+)", file.parent.name)
                seed = int(match.group(1)) if match else None
            label = meta.get("name") or (file.parent.parent.name if seed is not None else file.parent.name)
            results.append(MsoResult(label=str(label), seed=seed, dir=file.parent, rows=rows))
    return results


def select_runs(selector: str, runs: Sequence[Run]) -> list[Run]:
    """Runs under a folder (when `selector` is one) or whose cell label matches a glob pattern."""
    path = Path(selector)
    if path.exists():
        root = path.resolve()
        chosen = [r for r in runs if r.dir.resolve() == root or root in r.dir.resolve().parents]
    else:
        chosen = [r for r in runs if fnmatch.fnmatchcase(r.cell, selector) or r.cell == selector]
    if not chosen:
        cells = sorted({r.cell for r in runs})
        raise ValueError(f"compare {selector!r} matches no run; cells are {', '.join(cells[:12])}")
    return chosen
