"""Per-run configs of a sweep: the YAML layered after a cell's recipe (overrides, the merged callback
list, logger, folders and seed), its parse check, and after-step arguments with placeholders filled."""

from __future__ import annotations

import contextlib
import copy
import io
import re
import tempfile
from argparse import ArgumentError
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

import safeproj.callbacks
from safeproj.commands.sweep.spec import (
    DEFAULT_SEED_KEYS,
    PLACEHOLDER,
    AfterStep,
    Cell,
    Sweep,
    callback_ref,
    scoped_cell,
)

# Short names of safeproj callbacks, for adding one the recipe does not list: each class is importable
# from `safeproj.callbacks` (loaded lazily, so this imports no callback module).
KNOWN_CALLBACKS = {name: f"safeproj.callbacks.{name}" for name in safeproj.callbacks.__all__}


def read_yaml(path: Path) -> dict[str, Any]:
    """A LightningCLI config file as a mapping."""
    loaded = yaml.safe_load(path.read_text()) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: a LightningCLI config is a mapping")
    return loaded


def _layered(cell: Cell, section: str) -> Any:
    """The last value of `trainer.<section>` among the recipe and the cell's extra configs."""
    value = None
    for path in [cell.recipe, *cell.configs]:
        trainer = read_yaml(path).get("trainer") or {}
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
    ref, arg = callback_ref(key)
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
        if callback_ref(key)[0] is not None:
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
        if callback_ref(key)[0] is not None:  # a callback's seed: runs without that callback are left alone
            apply_callback_override(callbacks, key, seed, where, shared=True)
        else:
            _set_path(config, key.split("."), seed, where)
    labels = {
        "sweep": sweep,
        "cell": cell.name,
        "recipe": cell.recipe.stem,
        "seed": seed,
        "seed_keys": ",".join(seed_keys),
    }
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
            # One group per cell, so W&B's group-by averages a cell over its seeds.
            args.setdefault("name", f"{sweep}/{cell.name}/seed{seed}")
            args.setdefault("group", f"{sweep}/{cell.name}")
            args["tags"] = list(dict.fromkeys([*(args.get("tags") or []), f"sweep:{sweep}", f"cell:{cell.name}"]))
        trainer["logger"] = logger
    return config


def check_cell(cell: Cell, sweep: Sweep, out: Path) -> None:
    """Parse a cell's layered config with the CLI's parser, building nothing; ValueError naming the cell."""
    parse_cell(cell, sweep, out)


def parse_cell(cell: Cell, sweep: Sweep, out: Path) -> Any:
    """A cell's full config (its first seed's) as the CLI parses and checks it, building nothing; ValueError
    naming the cell."""
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
                return ParseOnly(run=False, args=args).config
        except SystemExit:
            raise ValueError(
                f"cell {cell.name!r}: its config does not parse: {_parse_error(errors.getvalue())}"
            ) from None
        except ArgumentError as err:  # the CLI raises its parse errors rather than exiting
            raise ValueError(
                f"cell {cell.name!r}: its config does not parse: {_parse_error(f'error: {err}')}"
            ) from None
        except ValueError as err:  # a spec, file or argument the CLI checks before any run starts
            raise ValueError(f"cell {cell.name!r}: {err}") from None


def _parse_error(text: str) -> str:
    """The gist of a jsonargparse error: its `error:` line and the most specific reason under it."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    start = next((i for i, line in enumerate(lines) if line.startswith("error:")), None)
    if start is None:
        return lines[-1] if lines else "unknown error"
    specific = re.compile(r"not accepted|No action|does not exist|Expected a|invalid|must be|unknown", re.IGNORECASE)
    detail = next((line for line in lines[start + 1 :] if specific.search(line)), "")
    return f"{lines[start].removeprefix('error:').strip()} {detail}".strip()


def fill_placeholders(value: Any, step: AfterStep, seed: int, sweep_out: Path) -> Any:
    """`{cell}` -> that cell's run folder for `seed`, `{seed}` -> seed, `{out_dir}` -> the sweep folder."""
    folders = {cell: str(sweep_out / cell / f"seed{seed}") for cell in step.cells}

    def sub(match: re.Match) -> str:
        key = match.group(1)
        if key == "seed":
            return str(seed)
        if key == "out_dir":
            return str(sweep_out)
        cell = scoped_cell(key, step.scope, set(folders))
        return folders[cell] if cell is not None else match.group(0)

    if isinstance(value, str):
        return PLACEHOLDER.sub(sub, value)
    if isinstance(value, list):
        return [fill_placeholders(v, step, seed, sweep_out) for v in value]
    if isinstance(value, dict):
        return {k: fill_placeholders(v, step, seed, sweep_out) for k, v in value.items()}
    return value


def after_arguments(
    step: AfterStep, seed: int, step_dir: Path, sweep_out: Path, parameters: set[str]
) -> dict[str, Any]:
    """An after-step's arguments for one seed: placeholders filled, `out_dir` defaulting to the step's folder."""
    args = {k: fill_placeholders(v, step, seed, sweep_out) for k, v in step.args.items()}
    if "out_dir" in parameters:
        args.setdefault("out_dir", str(step_dir))
    return args
