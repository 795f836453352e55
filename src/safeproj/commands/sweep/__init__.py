"""`safeproj sweep`: run a grid of recipe variants × seeds, one subprocess per run, resumable.

A sweep spec is a YAML file (see recipes/sweeps/):

    name: orthogonal             # default: the file's stem; out_dir defaults to runs/sweeps/<name>
    seeds: [0, 1, 2]             # one run per seed and cell
    seed_keys: [seed_everything, data.seed, model.seed]   # config keys set to the seed (the default)
    set: {trainer.max_steps: 30} # overrides for every run
    env: {OMP_NUM_THREADS: "1"}  # environment variables of the runs
    include: [parallel.yaml]     # specs whose runs and after-steps join as "<name>/<cell>" (with these seeds)
    runs:
      - name: online             # cell name; grid values are appended: online-frac=0.25-selection=top
        recipe: mixed            # recipes/<recipe>.yaml, or a path to a LightningCLI config
        configs: []              # more --config files layered after the recipe (presets)
        set: {OnlineProjection.keep: orthogonal}
        grid:                    # cartesian product of the listed values
          OnlineProjection.frac: [0.25, 0.75]
          OnlineProjection.selection: [top, random]
    after:                       # analyses run once per seed when the runs they name are done
      - name: safety-useful
        overlap: {a: "safety:tiny", b: "{useful}/checkpoint"}

After-steps call the function behind `safeproj <command>` (overlap, activations, eval, project, basis)
in the sweep's own process, with `{cell}` replaced by that cell's run folder for the seed, `{seed}` and
`{out_dir}` filled in, and `out_dir` defaulting to `out_dir/after/<name>/seed<k>/`; a step whose command
is not available is skipped with a note. A step is done when its `after.json` exists.

Override keys are dotted config paths (`model.lr`, `data.num_samples`, `trainer.max_steps`) or name a
callback of `trainer.callbacks` by its class name (or class path): `UtilityEval.num_samples: 8` sets
one init arg, `PosthocProjection: {subspace: safety, ...}` adds the callback (or merges init args into
it), `OnlineProjection: null` removes it. An init arg set in a spec-level `set` applies to the runs
that have that callback; in a run's own `set` or `grid` the callback must be there. The merged callback list
and logger are written, with the other overrides, to a small YAML file per run that is layered after
the recipe with `--config`, so callback init args never depend on how a command line edits lists.

Each run goes to `out_dir/<cell>/seed<k>/` (default_root_dir and logger save_dir), its output to
`run.log`, and gets a `RunSummary` callback: a run counts as done when its `summary.json` says so. A run
that crashed or was killed has none and is run again by the next invocation of the same command;
`out_dir/index.jsonl` gets one line per finished run or after-step.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml
from filelock import FileLock, Timeout
from tqdm.auto import tqdm

from safeproj.commands.prereq import presets_needed
from safeproj.io import write_json, write_text
from safeproj.runs import SUMMARY_FILE

DEFAULT_SEEDS = (0, 1, 2)
# What a seed sets: the global seed (dropout, random init), the data sample and order, which the data
# module draws with its own seed (without it, runs from fixed weights are identical across seeds), and
# the model's seed, which only the in-code `tiny` preset uses but Lightning requires to equal the data
# module's when it merges their hyperparameters.
DEFAULT_SEED_KEYS = ("seed_everything", "data.seed", "model.seed")
INDEX_FILE = "index.jsonl"
AFTER_FILE = "after.json"
AFTER_DIR = "after"
RUN_LOG = "run.log"
LOCK_FILE = ".sweep.lock"
SPEC_KEYS = ("name", "seeds", "seed_keys", "set", "env", "include", "runs", "after")
RUN_KEYS = ("name", "recipe", "configs", "set", "grid")
CONFIG_ROOTS = ("model", "data", "trainer", "seed_everything", "optimizer", "lr_scheduler", "ckpt_path")
# Commands an after-step may run (the analysis commands of `safeproj`, not sweep/report themselves).
AFTER_COMMANDS = ("overlap", "activations", "eval", "project", "basis")
# Short names of safeproj callbacks, for adding one the recipe does not list.
KNOWN_CALLBACKS = {
    "RunSummary": "safeproj.callbacks.summary.RunSummary",
    "OnlineProjection": "safeproj.callbacks.online_projection.OnlineProjection",
    "PosthocProjection": "safeproj.callbacks.posthoc_projection.PosthocProjection",
    "UtilityEval": "safeproj.callbacks.evaluation.UtilityEval",
    "HarmEval": "safeproj.callbacks.evaluation.HarmEval",
    "ActivationRecorder": "safeproj.callbacks.activation_recorder.ActivationRecorder",
}
_PLACEHOLDER = re.compile(r"\{([^{}]+)\}")
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]+")


# ---------------------------------------------------------------------------------------------
# Spec


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
    plain = isinstance(env, dict) and all(isinstance(k, str) and isinstance(v, (str, int, float)) for k, v in env.items())
    if not plain:
        raise ValueError(f"{path}: env must map variable names to strings, got {env!r}")
    env = {k: str(v) for k, v in env.items()}
    seed_keys = raw.get("seed_keys", list(DEFAULT_SEED_KEYS))
    if not isinstance(seed_keys, list) or not seed_keys or not all(isinstance(k, str) for k in seed_keys):
        raise ValueError(f"{path}: seed_keys must be a non-empty list of config keys, got {seed_keys!r}")
    for key in seed_keys:
        if key.split(".", 1)[0] not in CONFIG_ROOTS:
            raise ValueError(f"{path}: seed_keys entry {key!r} is not a config path under {', '.join(CONFIG_ROOTS)}")
    cells: list[Cell] = []
    after: list[AfterStep] = []
    for i, item in enumerate(_list(raw.get("include"), f"{path}: include")):
        if not isinstance(item, str):
            raise ValueError(f"{path}: include[{i}] must be a spec file name, got {item!r}")
        child_path = _find_file(item, [path.parent], f"{path}: include[{i}]")
        child = _load(child_path, prefix=f"{prefix}{_spec_name(child_path)}/", parents=(*parents, path.resolve()))
        for cell in child.cells:
            # The including spec's `set` applies on top of the included one's (e.g. smaller sizes).
            cell.overrides = {**cell.overrides, **common}
            cell.shared |= set(common)
        cells += child.cells
        after += child.after
        env = {**child.env, **env}
    for i, run in enumerate(_list(raw.get("runs"), f"{path}: runs")):
        cells += _expand_run(run, f"{path}: runs[{i}]", path, prefix, common)
    for i, step in enumerate(_list(raw.get("after"), f"{path}: after")):
        after.append(_after_step(step, f"{path}: after[{i}]", prefix, i))
    return Sweep(name=name, seeds=seeds, cells=cells, after=after, spec=path, env=env, seed_keys=list(seed_keys))


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
    if key.split(".", 1)[0] not in CONFIG_ROOTS and _callback_ref(key)[0] is None:
        raise ValueError(
            f"{where}: unknown key {key!r}; expected a config path under {', '.join(CONFIG_ROOTS)} "
            "or a callback class name (e.g. UtilityEval.num_samples)"
        )


def _callback_ref(key: str) -> tuple[str | None, str | None]:
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
    configs = [_find_file(c, [spec.parent, Path.cwd()], f"{where}.configs") if isinstance(c, str) else None
               for c in _list(run.get("configs"), f"{where}.configs")]
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
        cells.append(Cell(name=f"{prefix}{name}{suffix}", recipe=recipe, configs=list(configs),
                          overrides={**base, **chosen}, shared=shared))
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
        return _PLACEHOLDER.findall(value)
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
        cell = _scoped(placeholder, step.scope, names)
        if cell is None:
            raise ValueError(
                f"{spec}: after step {step.name!r} names {{{placeholder}}}, which is not a cell of the sweep"
            )
        cells.append(cell)
    return list(dict.fromkeys(cells))


def _scoped(name: str, scope: str, names: set[str]) -> str | None:
    for candidate in (f"{scope}{name}", name):
        if candidate in names:
            return candidate
    return None


# ---------------------------------------------------------------------------------------------
# Per-run config


def _read_yaml(path: Path) -> dict[str, Any]:
    loaded = yaml.safe_load(path.read_text()) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: a LightningCLI config is a mapping")
    return loaded


def _layered(cell: Cell, section: str) -> Any:
    """The last value of `trainer.<section>` among the recipe and the cell's extra configs."""
    value = None
    for path in [cell.recipe, *cell.configs]:
        trainer = _read_yaml(path).get("trainer") or {}
        if section in trainer:
            value = trainer[section]
    return copy.deepcopy(value)


def _class_matches(entry: Any, ref: str) -> bool:
    path = entry.get("class_path", "") if isinstance(entry, dict) else ""
    return path == ref or path.rsplit(".", 1)[-1] == ref


def _set_path(tree: dict, keys: list[str], value: Any, where: str) -> None:
    node = tree
    for i, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ValueError(f"{where}: {'.'.join(keys[: i + 1])} is {child!r}, not a mapping")
        node = child
    node[keys[-1]] = copy.deepcopy(value)


def apply_callback_override(callbacks: list[dict], key: str, value: Any, where: str, shared: bool = False) -> None:
    """Edit a `trainer.callbacks` list in place for one `Class[.arg]` override.

    A `shared` init-arg override (from a spec-level `set`) leaves runs without that callback alone.
    """
    ref, arg = _callback_ref(key)
    matches = [entry for entry in callbacks if _class_matches(entry, ref)]
    if shared and arg is not None and not matches:
        return
    if arg is None:
        if value is None:
            callbacks[:] = [entry for entry in callbacks if not _class_matches(entry, ref)]
            return
        if not isinstance(value, dict):
            raise ValueError(f"{where}: {key} takes a mapping of init args (or null to remove it), got {value!r}")
        if not matches:
            class_path = ref if "." in ref else KNOWN_CALLBACKS.get(ref)
            if class_path is None:
                raise ValueError(
                    f"{where}: {key} is not in the recipe's callbacks; add it by class path "
                    f"or use one of {', '.join(KNOWN_CALLBACKS)}"
                )
            callbacks.append({"class_path": class_path, "init_args": {}})
            matches = callbacks[-1:]
        for entry in matches:
            entry.setdefault("init_args", {})
            entry["init_args"] = {**(entry["init_args"] or {}), **copy.deepcopy(value)}
        return
    if not matches:
        raise ValueError(f"{where}: {key} sets an init arg of {ref}, which is not among the run's callbacks")
    for entry in matches:
        args = entry.get("init_args") or {}
        entry["init_args"] = args
        _set_path(args, arg.split("."), value, where)


def run_config(
    cell: Cell, seed: int, run_dir: Path, sweep: str, seed_keys: Sequence[str] = DEFAULT_SEED_KEYS
) -> dict[str, Any]:
    """The YAML layered after the recipe: overrides, full callback list, logger, root dir and seed."""
    where = f"cell {cell.name!r}"
    callbacks = _layered(cell, "callbacks") or []
    if not isinstance(callbacks, list):
        raise ValueError(f"{cell.recipe}: trainer.callbacks must be a list of class_path/init_args entries")
    logger = _layered(cell, "logger")
    config: dict[str, Any] = {}
    for key, value in cell.overrides.items():
        if _callback_ref(key)[0] is not None:
            apply_callback_override(callbacks, key, value, where, shared=key in cell.shared)
        elif key.startswith("trainer.logger.") and isinstance(logger, dict):
            _set_path(logger, key.split(".")[2:], value, where)
        elif key in ("trainer.callbacks", "trainer.logger"):
            raise ValueError(f"{where}: set {key} through callback names or trainer.logger.<arg>, not as a whole")
        else:
            _set_path(config, key.split("."), value, where)
    for key in seed_keys:
        if key in cell.overrides:
            raise ValueError(f"{where}: {key} is set per seed (seed_keys); leave it out of `set` and `grid`")
        _set_path(config, key.split("."), seed, where)
    labels = {"sweep": sweep, "cell": cell.name, "recipe": cell.recipe.stem, "seed": seed,
              "seed_keys": ",".join(seed_keys)}
    callbacks = [entry for entry in callbacks if not _class_matches(entry, "RunSummary")]
    callbacks.append({"class_path": KNOWN_CALLBACKS["RunSummary"], "init_args": {"labels": labels}})
    trainer = config.setdefault("trainer", {})
    trainer["callbacks"] = callbacks
    trainer["default_root_dir"] = str(run_dir)
    if isinstance(logger, dict) and "class_path" in logger:
        args = logger.setdefault("init_args", {}) or {}
        logger["init_args"] = args
        args["save_dir"] = str(run_dir)
        if "Wandb" in logger["class_path"]:
            args.setdefault("name", f"{sweep}/{cell.name}/seed{seed}")
            args["tags"] = list(dict.fromkeys([*(args.get("tags") or []), f"sweep:{sweep}"]))
        trainer["logger"] = logger
    return config


def check_cell(cell: Cell, sweep: Sweep, out: Path) -> None:
    """Parse a cell's layered config with the CLI's parser, building nothing; ValueError naming the cell."""
    import io
    import tempfile

    from safeproj.commands.fit import SafeprojCLI

    class ParseOnly(SafeprojCLI):
        def _set_seed(self) -> None:  # a parse check should not seed (or log "Seed set to") anything
            pass

        def instantiate_classes(self) -> None:
            pass

    seed = sweep.seeds[0]
    config = run_config(cell, seed, out / cell.name / f"seed{seed}", sweep.name, sweep.seed_keys)
    with tempfile.TemporaryDirectory() as tmp:
        overrides = Path(tmp) / f"{cell.recipe.stem}.yaml"
        overrides.write_text(yaml.safe_dump(config, sort_keys=False))
        args = [arg for path in (cell.recipe, *cell.configs, overrides) for arg in ("--config", str(path))]
        errors = io.StringIO()
        try:
            with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
                ParseOnly(run=False, args=args)
        except SystemExit:
            raise ValueError(f"cell {cell.name!r}: its config does not parse: {_parse_error(errors.getvalue())}") from None


def _parse_error(text: str) -> str:
    """The gist of a jsonargparse error: its `error:` line and the most specific reason under it."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    start = next((i for i, line in enumerate(lines) if line.startswith("error:")), None)
    if start is None:
        return lines[-1] if lines else "unknown error"
    specific = re.compile(r"not accepted|No action|does not exist|Expected a|invalid|must be|unknown", re.IGNORECASE)
    detail = next((line for line in lines[start + 1:] if specific.search(line)), "")
    return f"{lines[start].removeprefix('error:').strip()} {detail}".strip()


# ---------------------------------------------------------------------------------------------
# Running


def launch(cmd: list[str], log: Path, env: dict[str, str]) -> int:
    """Run `cmd` with stdout and stderr streamed to `log`; the exit code. Ctrl-C stops the child too."""
    with open(log, "ab", buffering=0) as out:
        out.write(f"$ {' '.join(cmd)}\n".encode())
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            return process.wait()
        except BaseException:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
            raise


def is_done(run_dir: Path, filename: str = SUMMARY_FILE) -> bool:
    """Whether the run's summary exists and says it finished."""
    file = run_dir / filename
    if not file.is_file():
        return False
    try:
        return json.loads(file.read_text()).get("status") == "done"
    except (OSError, ValueError):
        return False


def _clear_partial(run_dir: Path) -> None:
    """Remove what a crashed attempt left, keeping its log as run.log.<n>."""
    if not run_dir.exists():
        return
    old_log = run_dir / RUN_LOG
    for entry in run_dir.iterdir():
        if entry.name.startswith(RUN_LOG):
            continue
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    if old_log.is_file():
        n = 1
        while (run_dir / f"{RUN_LOG}.{n}").exists():
            n += 1
        os.replace(old_log, run_dir / f"{RUN_LOG}.{n}")


def _append_index(out_dir: Path, record: dict[str, Any]) -> None:
    # One short line per write in append mode: lines of concurrent writers never interleave.
    line = json.dumps(record, sort_keys=True) + "\n"
    with open(out_dir / INDEX_FILE, "a") as handle:
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _env(sweep: Sweep) -> dict[str, str]:
    env = {**os.environ, **sweep.env}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _presets(sweep: Sweep) -> list[str]:
    """Presets whose safety-tuned version the runs need (`<preset>-safety` models, `safety:<preset>` specs)."""
    values: list[Any] = []
    for cell in sweep.cells:
        if "model.model" not in cell.overrides:
            values.append((_read_yaml(cell.recipe).get("model") or {}).get("model"))
        values.append(cell.overrides)
    values.extend(step.args for step in sweep.after)
    return presets_needed(values)


def _prepare(sweep: Sweep, out_dir: Path, env: dict[str, str]) -> None:
    """Make the safety-tuned presets once, before the runs, in a process of their own.

    A run would otherwise make them inside its own model set-up, costing the first run minutes and
    mixing that work into its log.
    """
    presets = _presets(sweep)
    if not presets:
        return
    log = out_dir / "prepare.log"
    tqdm.write(f"preparing safety-tuned presets: {', '.join(presets)} (made once, then cached)")
    for preset in presets:
        code_rc = launch([sys.executable, "-m", "safeproj.cli", "prereq", preset], log, env)
        if code_rc != 0:
            raise ValueError(f"preparing preset {preset} failed (exit {code_rc}); see {log}")


def fit_command(cell: Cell, run_dir: Path, overrides: Path) -> list[str]:
    cmd = [sys.executable, "-m", "safeproj.cli", "fit", "--config", str(cell.recipe)]
    for config in cell.configs:
        cmd += ["--config", str(config)]
    return cmd + ["--config", str(overrides)]


def fill_placeholders(value: Any, step: AfterStep, seed: int, sweep_out: Path) -> Any:
    """`{cell}` -> that cell's run folder for `seed`, `{seed}` -> seed, `{out_dir}` -> the sweep folder."""
    folders = {cell: str(sweep_out / cell / f"seed{seed}") for cell in step.cells}

    def sub(match: re.Match) -> str:
        key = match.group(1)
        if key == "seed":
            return str(seed)
        if key == "out_dir":
            return str(sweep_out)
        cell = _scoped(key, step.scope, set(folders))
        return folders[cell] if cell is not None else match.group(0)

    if isinstance(value, str):
        return _PLACEHOLDER.sub(sub, value)
    if isinstance(value, list):
        return [fill_placeholders(v, step, seed, sweep_out) for v in value]
    if isinstance(value, dict):
        return {k: fill_placeholders(v, step, seed, sweep_out) for k, v in value.items()}
    return value


def after_function(command: str) -> Callable[..., Any] | None:
    """The function behind `safeproj <command>`, or None when its module is not available here."""
    from safeproj.commands import COMMANDS

    module, _, name = COMMANDS.get(command, ":").partition(":")
    if not module or importlib.util.find_spec(module) is None:
        return None
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def after_arguments(
    step: AfterStep, seed: int, step_dir: Path, sweep_out: Path, parameters: set[str]
) -> dict[str, Any]:
    args = {k: fill_placeholders(v, step, seed, sweep_out) for k, v in step.args.items()}
    if "out_dir" in parameters:
        args.setdefault("out_dir", str(step_dir))
    return args


@dataclass
class SweepResult:
    out_dir: Path
    total: int = 0
    skipped: int = 0
    ran: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    after_ran: list[str] = field(default_factory=list)
    after_skipped: list[str] = field(default_factory=list)
    planned: list[list[str]] = field(default_factory=list)


def run_sweep(
    spec: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    seeds: Sequence[int] | None = None,
    dry_run: bool = False,
    max_runs: int | None = None,
) -> SweepResult:
    """Run every cell × seed not done yet, then the after-steps whose runs are done."""
    sweep = load_spec(spec, seeds)
    if max_runs is not None and (isinstance(max_runs, bool) or not isinstance(max_runs, int) or max_runs < 0):
        raise ValueError(f"max_runs must be a non-negative integer, got {max_runs!r}")
    out = Path(out_dir or Path("runs") / "sweeps" / sweep.name).resolve()
    steps = check_after(sweep)
    plan = [(cell, seed) for seed in sweep.seeds for cell in sweep.cells]
    result = SweepResult(out_dir=out, total=len(plan))
    todo = [(cell, seed) for cell, seed in plan if not is_done(out / cell.name / f"seed{seed}")]
    result.skipped = len(plan) - len(todo)
    # Every cell still to run is parsed as its runs will be, so a typo fails now, not hours in.
    for cell in dict.fromkeys(cell.name for cell, _ in todo):
        check_cell(next(c for c in sweep.cells if c.name == cell), sweep, out)
    if dry_run:
        for cell in sweep.cells:
            seeds_todo = [seed for c, seed in todo if c is cell]
            for seed in seeds_todo:
                run_dir = out / cell.name / f"seed{seed}"
                result.planned.append(fit_command(cell, run_dir, run_dir / "overrides" / f"{cell.recipe.stem}.yaml"))
            if seeds_todo:
                overrides = json.dumps(cell.overrides, default=str)
                tqdm.write(f"would run {cell.name} seeds {seeds_todo}: {cell.recipe.name} + {overrides}")
        for step in sweep.after:
            for seed in sweep.seeds:
                args = after_arguments(step, seed, out / AFTER_DIR / step.name / f"seed{seed}", out, {"out_dir"})
                result.planned.append([step.command, json.dumps(args)])
                tqdm.write(f"would run after-step {step.name} seed{seed}: {step.command}({json.dumps(args)})")
        tqdm.write(f"{len(todo)} of {len(plan)} runs to do, {result.skipped} done; nothing run (dry run)")
        return result
    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(out / LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ValueError(f"{out}: another sweep is running in this folder (lock {out / LOCK_FILE})") from None
    try:
        with _sigterm_as_interrupt():
            _run_all(sweep, out, todo, plan, max_runs, result, steps)
    finally:
        lock.release()
    return result


def _run_all(
    sweep: Sweep, out: Path, todo: list, plan: list, max_runs: int | None, result: SweepResult, steps: dict
) -> None:
    env = _env(sweep)
    if todo:
        tqdm.write(f"sweep {sweep.name}: {len(plan)} runs, {result.skipped} already done -> {out}")
        _prepare(sweep, out, env)
    budget = len(todo) if max_runs is None else min(max_runs, len(todo))
    bar = tqdm(total=len(plan), initial=result.skipped, desc=f"sweep {sweep.name}", unit="run")
    try:
        for cell, seed in todo[:budget]:
            ok, seconds = _run_one(sweep, cell, seed, out, env)
            label = f"{cell.name} seed{seed}"
            (result.ran if ok else result.failed).append(label)
            status = "done" if ok else f"FAILED, see {out / cell.name / f'seed{seed}' / RUN_LOG}"
            tqdm.write(f"[{bar.n + 1}/{len(plan)}] {label}: {status} in {seconds:.1f} s")
            bar.update(1)
    finally:
        bar.close()
    _run_after(sweep, out, result, steps)


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """A SIGTERM to the sweep stops its current run too (as Ctrl-C does) instead of orphaning it."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_one(sweep: Sweep, cell: Cell, seed: int, out: Path, env: dict[str, str]) -> tuple[bool, float]:
    run_dir = out / cell.name / f"seed{seed}"
    _clear_partial(run_dir)
    overrides = run_dir / "overrides" / f"{cell.recipe.stem}.yaml"
    # Named after the recipe: the CLI takes the W&B group and tag from the last config's name.
    config = run_config(cell, seed, run_dir, sweep.name, sweep.seed_keys)
    overrides.parent.mkdir(parents=True, exist_ok=True)
    write_text(overrides, yaml.safe_dump(config, sort_keys=False))
    start = time.time()
    code = launch(fit_command(cell, run_dir, overrides), run_dir / RUN_LOG, env)
    seconds = time.time() - start
    ok = code == 0 and is_done(run_dir)
    if ok:
        _append_index(out, {"kind": "run", "cell": cell.name, "seed": seed, "dir": str(run_dir.relative_to(out)),
                            "recipe": cell.recipe.stem, "seconds": round(seconds, 2), "finished": _now()})
    elif code == 0:
        with open(run_dir / RUN_LOG, "a") as log:
            log.write(f"\nsafeproj sweep: the run exited 0 but wrote no {SUMMARY_FILE} with status done\n")
    return ok, seconds


def check_after(sweep: Sweep) -> dict[str, tuple[Callable[..., Any], set[str]] | None]:
    """Each after-step's function and parameter names (None: command not available); ValueError on unknown args."""
    import inspect

    found: dict[str, tuple[Callable[..., Any], set[str]] | None] = {}
    for step in sweep.after:
        function = after_function(step.command)
        if function is None:
            found[step.name] = None
            continue
        parameters = set(inspect.signature(function).parameters)
        unknown = sorted(set(step.args) - parameters)
        if unknown:
            raise ValueError(f"after step {step.name!r}: `safeproj {step.command}` has no argument {unknown[0]!r}")
        found[step.name] = (function, parameters)
    return found


def _run_after(sweep: Sweep, out: Path, result: SweepResult, steps: dict) -> None:
    """Run each after-step per seed whose cells are done, in this process (an analysis, not a run)."""
    import traceback

    for step in sweep.after:
        if steps.get(step.name) is None:
            tqdm.write(f"after-step {step.name}: `safeproj {step.command}` is not available here; skipped")
            continue
        function, parameters = steps[step.name]
        for seed in sweep.seeds:
            label = f"{step.name} seed{seed}"
            step_dir = out / AFTER_DIR / step.name / f"seed{seed}"
            if (step_dir / AFTER_FILE).is_file():
                result.after_skipped.append(label)
                continue
            waiting = [c for c in step.cells if not is_done(out / c / f"seed{seed}")]
            if waiting:
                tqdm.write(f"after-step {label}: waits for {', '.join(waiting)}")
                continue
            _clear_partial(step_dir)
            step_dir.mkdir(parents=True, exist_ok=True)
            args = after_arguments(step, seed, step_dir, out, parameters)
            start = time.time()
            with open(step_dir / RUN_LOG, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                print(f"{step.command}({json.dumps(args)})", flush=True)
                try:
                    function(**args)
                    ok = True
                except Exception:  # noqa: BLE001 - one failed analysis must not stop the others
                    traceback.print_exc()
                    ok = False
            seconds = time.time() - start
            if not ok:
                result.failed.append(label)
                tqdm.write(f"after-step {label}: FAILED in {seconds:.1f} s, see {step_dir / RUN_LOG}")
                continue
            record = {"kind": "after", "name": step.name, "command": step.command, "seed": seed,
                      "cells": step.cells, "args": args, "status": "done", "seconds": round(seconds, 2)}
            write_json(step_dir / AFTER_FILE, record, allow_nan=False)
            _append_index(out, {**record, "dir": str(step_dir.relative_to(out)), "finished": _now()})
            result.after_ran.append(label)
            tqdm.write(f"after-step {label}: done in {seconds:.1f} s")


def sweep_command(
    spec: str,
    out_dir: str | None = None,
    seeds: list[int] | None = None,
    dry_run: bool = False,
    max_runs: int | None = None,
) -> dict[str, Any]:
    """Run a sweep spec: every cell × seed in its own folder, skipping runs already done.

    Run the same command again after a crash or a kill: finished runs are skipped, unfinished ones
    start over.

    Args:
        spec: a sweep spec YAML (see recipes/sweeps/).
        out_dir: where run folders go; default `runs/sweeps/<spec name>`.
        seeds: seeds to run instead of the spec's.
        dry_run: print what would run, run nothing, write nothing.
        max_runs: stop after starting this many runs (after-steps still run for what is done).

    Returns:
        Counts of runs: total, skipped (already done), ran, failed.
    """
    result = run_sweep(spec, out_dir, seeds, dry_run, max_runs)
    if result.failed:
        raise SystemExit(
            f"safeproj sweep: {len(result.failed)} failed ({', '.join(result.failed[:3])}"
            f"{', …' if len(result.failed) > 3 else ''}); fix and run the same command again to finish"
        )
    return {"out_dir": str(result.out_dir), "total": result.total, "skipped": result.skipped,
            "ran": len(result.ran), "failed": len(result.failed)}
