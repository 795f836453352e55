"""Sweep specs: reading a sweep YAML into cells (recipe + overrides) and after-steps, with every check
that can fail before a run starts. The spec format is described in docs/sweeps.md."""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_SEEDS = (0, 1, 2)
# What a seed sets: the global seed (dropout, random init), the data sample and order, which the data
# module draws with its own seed (without it, runs from fixed weights are identical across seeds), and
# the model's seed, which only the in-code `tiny` preset uses but Lightning requires to equal the data
# module's when it merges their hyperparameters.
DEFAULT_SEED_KEYS = ("seed_everything", "data.seed", "model.seed")
AFTER_DIR = "after"  # after-step outputs: <out_dir>/after/<step>/seed<k>/
AFTER_FILE = "after.json"  # written when an after-step has finished
SPEC_KEYS = ("name", "seeds", "seed_keys", "set", "env", "include", "replace", "runs", "after")
RUN_KEYS = ("name", "recipe", "configs", "set", "grid")
CONFIG_ROOTS = ("model", "data", "trainer", "seed_everything", "optimizer", "lr_scheduler", "ckpt_path")
# Commands an after-step may run (the analysis commands of `safeproj`, not sweep/report themselves).
AFTER_COMMANDS = ("overlap", "activations", "eval", "project", "basis")
PLACEHOLDER = re.compile(r"\{([^{}]+)\}")
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]+")


@dataclass
class Cell:
    """One grid point: a recipe plus overrides; run once per seed."""

    name: str
    recipe: Path
    configs: list[Path]
    overrides: dict[str, Any]
    # Keys from a spec-level `set`: a callback init arg there applies only to runs that have the callback.
    shared: set[str] = field(default_factory=set)


@dataclass
class AfterStep:
    """A `safeproj <command>` run once per seed after the cells its arguments name."""

    name: str
    command: str
    args: dict[str, Any]
    scope: str = ""  # cell-name prefix of the spec that defined it (for `{cell}` placeholders)
    cells: list[str] = field(default_factory=list)


@dataclass
class Sweep:
    """A checked spec: its cells (included specs' cells prefixed), seeds, after-steps and run environment."""

    name: str
    seeds: list[int]
    cells: list[Cell]
    after: list[AfterStep]
    spec: Path
    env: dict[str, str] = field(default_factory=dict)
    seed_keys: list[str] = field(default_factory=lambda: list(DEFAULT_SEED_KEYS))


def load_spec(spec: str | os.PathLike, seeds: Sequence[int] | None = None) -> Sweep:
    """Read and check a sweep spec; a bad spec raises a one-line ValueError naming the key."""
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"sweep spec {str(spec)!r} does not exist")
    sweep = _load(path, prefix="", parents=())
    if seeds is not None:
        sweep.seeds = _check_seeds(list(seeds), "seeds")
    names = [c.name for c in sweep.cells]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{path}: cell name {duplicates[0]!r} appears twice; give the runs distinct `name`s")
    if not sweep.cells:
        raise ValueError(f"{path}: `runs` is empty (and no included spec has runs)")
    reserved = [n for n in names if n.split("/")[0] == AFTER_DIR or n.startswith(".")]
    if reserved:
        raise ValueError(f"{path}: cell name {reserved[0]!r} is reserved (after-step outputs go to {AFTER_DIR}/)")
    for step in sweep.after:
        step.cells = _referenced_cells(step, set(names), path)
    return sweep


def _load(path: Path, prefix: str, parents: tuple[Path, ...]) -> Sweep:
    if path.resolve() in parents:
        raise ValueError(f"{path}: `include` loops back to itself")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a sweep spec is a mapping with `runs`")
    unknown = [k for k in raw if k not in SPEC_KEYS]
    if unknown:
        raise ValueError(f"{path}: unknown key {unknown[0]!r}; expected some of {', '.join(SPEC_KEYS)}")
    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not name or _UNSAFE.search(name):
        raise ValueError(f"{path}: `name` must be a plain name (letters, digits, . _ - =), got {name!r}")
    seeds = _check_seeds(raw.get("seeds", list(DEFAULT_SEEDS)), f"{path}: seeds")
    common = _mapping(raw.get("set"), f"{path}: set")
    env = raw.get("env") or {}
    plain = isinstance(env, dict) and all(
        isinstance(k, str) and isinstance(v, (str, int, float)) for k, v in env.items()
    )
    if not plain:
        raise ValueError(f"{path}: env must map variable names to strings, got {env!r}")
    env = {k: str(v) for k, v in env.items()}
    seed_keys = raw.get("seed_keys", list(DEFAULT_SEED_KEYS))
    if not isinstance(seed_keys, list) or not seed_keys or not all(isinstance(k, str) for k in seed_keys):
        raise ValueError(f"{path}: seed_keys must be a non-empty list of config keys, got {seed_keys!r}")
    for key in seed_keys:
        if key.split(".", 1)[0] not in CONFIG_ROOTS and callback_ref(key)[1] is None:
            raise ValueError(
                f"{path}: seed_keys entry {key!r} is neither a config path under {', '.join(CONFIG_ROOTS)} "
                "nor a callback argument (e.g. PosthocProjection.seed)"
            )
    replace, replaced = _replacements(raw.get("replace"), path), set()
    cells: list[Cell] = []
    after: list[AfterStep] = []
    for i, item in enumerate(_list(raw.get("include"), f"{path}: include")):
        if not isinstance(item, str):
            raise ValueError(f"{path}: include[{i}] must be a spec file name, got {item!r}")
        child_path = _find_file(item, [path.parent], f"{path}: include[{i}]")
        child = _load(child_path, prefix=f"{prefix}{_spec_name(child_path)}/", parents=(*parents, path.resolve()))
        for cell in child.cells:
            # The including spec's `set` applies on top of the included one's (e.g. smaller sizes), and its
            # `replace` swaps config files in them (e.g. a stand-in model for a hub model).
            replaced |= {c.resolve() for c in cell.configs} & set(replace)
            swapped = [replace.get(c.resolve(), c) for c in cell.configs]
            cell.configs = [c for c in swapped if c is not None]
            cell.overrides = {**cell.overrides, **common}
            cell.shared |= set(common)
        cells += child.cells
        after += child.after
        env = {**child.env, **env}
    unused = sorted(str(c) for c in set(replace) - replaced)
    if unused:
        raise ValueError(f"{path}: replace names {unused[0]}, which no included run uses")
    for i, run in enumerate(_list(raw.get("runs"), f"{path}: runs")):
        cells += _expand_run(run, f"{path}: runs[{i}]", path, prefix, common)
    for i, step in enumerate(_list(raw.get("after"), f"{path}: after")):
        after.append(_after_step(step, f"{path}: after[{i}]", prefix, i))
    return Sweep(name=name, seeds=seeds, cells=cells, after=after, spec=path, env=env, seed_keys=list(seed_keys))


def _replacements(value: Any, path: Path) -> dict[Path, Path | None]:
    """`replace`: config file of an included spec -> the file to use instead, or null to drop it."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"{path}: replace must map config file names to file names (or null), got {value!r}")
    out: dict[Path, Path | None] = {}
    for old, new in value.items():
        if new is not None and not isinstance(new, str):
            raise ValueError(f"{path}: replace.{old}: expected a config file name or null, got {new!r}")
        key = _find_file(old, [path.parent, Path.cwd()], f"{path}: replace")
        out[key.resolve()] = (
            None if new is None else _find_file(new, [path.parent, Path.cwd()], f"{path}: replace.{old}")
        )
    return out


def _spec_name(path: Path) -> str:
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        raw = None
    name = raw.get("name") if isinstance(raw, dict) else None
    return name if isinstance(name, str) and name else path.stem


def _check_seeds(seeds: Any, where: str) -> list[int]:
    if not isinstance(seeds, list) or not seeds:
        raise ValueError(f"{where}: expected a non-empty list of integers, got {seeds!r}")
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"{where}: seed {seed!r} is not a non-negative integer")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"{where}: seeds repeat in {seeds!r}")
    return list(seeds)


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"{where}: expected a mapping of dotted keys, got {value!r}")
    for key in value:
        _check_key(key, where)
    return dict(value)


def _list(value: Any, where: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError(f"{where}: expected a list, got {value!r}")
    return value


def _check_key(key: str, where: str) -> None:
    if not key or any(not part for part in key.split(".")):
        raise ValueError(f"{where}: bad key {key!r}")
    if key.split(".", 1)[0] not in CONFIG_ROOTS and callback_ref(key)[0] is None:
        raise ValueError(
            f"{where}: unknown key {key!r}; expected a config path under {', '.join(CONFIG_ROOTS)} "
            "or a callback class name (e.g. UtilityEval.num_samples)"
        )


def callback_ref(key: str) -> tuple[str | None, str | None]:
    """(callback name or class path, init arg or None) of an override key, (None, None) for config paths."""
    parts = key.split(".")
    if parts[0] in CONFIG_ROOTS:
        return None, None
    # A class path is module parts (lower case) then a class name (upper case first letter).
    for i, part in enumerate(parts):
        if part[:1].isupper():
            return ".".join(parts[: i + 1]), ".".join(parts[i + 1 :]) or None
    return None, None


def _find_file(name: str, folders: Sequence[Path], where: str) -> Path:
    candidates = [Path(name)] + [folder / name for folder in folders]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise ValueError(f"{where}: file {name!r} not found (looked in {', '.join(str(f) for f in folders)})")


def _find_recipe(recipe: Any, spec: Path, where: str) -> Path:
    if not isinstance(recipe, str) or not recipe:
        raise ValueError(f"{where}.recipe: expected a recipe name or path, got {recipe!r}")
    file = recipe if recipe.endswith((".yaml", ".yml")) else f"{recipe}.yaml"
    folders = [spec.parent, spec.parent.parent, Path.cwd() / "recipes", Path.cwd()]
    return _find_file(file, folders, f"{where}.recipe")


def _expand_run(run: Any, where: str, spec: Path, prefix: str, common: dict[str, Any]) -> list[Cell]:
    if not isinstance(run, dict):
        raise ValueError(f"{where}: expected a mapping with `recipe`, got {run!r}")
    unknown = [k for k in run if k not in RUN_KEYS]
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}; expected some of {', '.join(RUN_KEYS)}")
    recipe = _find_recipe(run.get("recipe"), spec, where)
    name = run.get("name", recipe.stem)
    if not isinstance(name, str) or not name or _UNSAFE.search(name):
        raise ValueError(f"{where}.name: a plain name (letters, digits, . _ - =), got {name!r}")
    configs = [
        _find_file(c, [spec.parent, Path.cwd()], f"{where}.configs") if isinstance(c, str) else None
        for c in _list(run.get("configs"), f"{where}.configs")
    ]
    if any(c is None for c in configs):
        raise ValueError(f"{where}.configs: expected file names")
    base = {**common, **_mapping(run.get("set"), f"{where}.set")}
    grid = _mapping(run.get("grid"), f"{where}.grid")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"{where}.grid.{key}: expected a non-empty list of values, got {values!r}")
    cells = []
    for combo in itertools.product(*grid.values()) if grid else [()]:
        chosen = dict(zip(grid, combo))
        suffix = "".join(f"-{key.rsplit('.', 1)[-1]}={_label(value)}" for key, value in chosen.items())
        shared = {k for k in common if k not in (run.get("set") or {}) and k not in chosen}
        cells.append(
            Cell(
                name=f"{prefix}{name}{suffix}",
                recipe=recipe,
                configs=list(configs),
                overrides={**base, **chosen},
                shared=shared,
            )
        )
    return cells


def _label(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, (list, tuple)):
        text = ",".join(_label(v) for v in value)
    elif isinstance(value, dict):
        text = ",".join(f"{k}={_label(v)}" for k, v in value.items())
    else:
        text = str(value)
    return _UNSAFE.sub("_", text) or "_"


def _after_step(step: Any, where: str, prefix: str, index: int) -> AfterStep:
    if not isinstance(step, dict):
        raise ValueError(f"{where}: expected a mapping like {{overlap: {{a: ..., b: ...}}}}, got {step!r}")
    commands = [k for k in step if k != "name"]
    if len(commands) != 1 or commands[0] not in AFTER_COMMANDS:
        raise ValueError(
            f"{where}: expected exactly one command of {', '.join(AFTER_COMMANDS)} (and an optional name), "
            f"got {sorted(step)}"
        )
    command = commands[0]
    args = step[command]
    if not isinstance(args, dict) or not all(isinstance(k, str) for k in args):
        raise ValueError(f"{where}.{command}: expected a mapping of the command's arguments, got {args!r}")
    name = step.get("name", f"{command}-{index}")
    if not isinstance(name, str) or not name or _UNSAFE.search(name):
        raise ValueError(f"{where}.name: a plain name (letters, digits, . _ - =), got {name!r}")
    return AfterStep(name=f"{prefix}{name}", command=command, args=dict(args), scope=prefix)


def _placeholders(value: Any) -> list[str]:
    if isinstance(value, str):
        return PLACEHOLDER.findall(value)
    if isinstance(value, list):
        return [p for v in value for p in _placeholders(v)]
    if isinstance(value, dict):
        return [p for v in value.values() for p in _placeholders(v)]
    return []


def _referenced_cells(step: AfterStep, names: set[str], spec: Path) -> list[str]:
    cells = []
    for placeholder in _placeholders(step.args):
        if placeholder in ("seed", "out_dir"):
            continue
        cell = scoped_cell(placeholder, step.scope, names)
        if cell is None:
            raise ValueError(
                f"{spec}: after step {step.name!r} names {{{placeholder}}}, which is not a cell of the sweep"
            )
        cells.append(cell)
    return list(dict.fromkeys(cells))


def scoped_cell(name: str, scope: str, names: set[str]) -> str | None:
    """The cell a placeholder names: first within the scope of the spec that wrote it, then sweep-wide."""
    for candidate in (f"{scope}{name}", name):
        if candidate in names:
            return candidate
    return None
