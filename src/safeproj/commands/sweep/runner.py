"""Running a sweep: one subprocess per cell and seed, a lock on the sweep folder, skip and resume by
each run's summary.json, the index of finished work, and the after-steps once their runs are done.

A little over 400 lines: process handling (groups, parent-death signal, per-run locks) and the loop
that uses it belong together; splitting them would put one half of each protocol in each file."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # not POSIX: no per-run lock
    fcntl = None

import yaml
from filelock import FileLock, Timeout
from tqdm.auto import tqdm

from safeproj.commands import COMMANDS
from safeproj.commands.lifetime import FOLLOW_PARENT_ENV, die_with_parent
from safeproj.commands.prereq import safety_models_needed
from safeproj.commands.sweep.config import after_arguments, check_cell, read_yaml, run_config
from safeproj.commands.sweep.spec import AFTER_DIR, AFTER_FILE, Cell, Sweep, load_spec
from safeproj.io import write_json, write_text
from safeproj.runs import SUMMARY_FILE

INDEX_FILE = "index.jsonl"
RUN_LOG = "run.log"
LOCK_FILE = ".sweep.lock"


def launch(cmd: list[str], log: Path, env: dict[str, str], keep_fds: Sequence[int] = ()) -> int:
    """Run `cmd` with stdout and stderr streamed to `log`; the exit code.

    The run gets a process group of its own, which is killed when the run ends or the sweep is stopped
    (Ctrl-C, SIGTERM), so nothing it started outlives it; on Linux the kernel also kills the run if the
    sweep dies without cleaning up (SIGKILL). `keep_fds` stay open in the run (the run's lock).
    """
    with open(log, "ab", buffering=0) as out:
        out.write(f"$ {' '.join(cmd)}\n".encode())
        process = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            preexec_fn=die_with_parent(), pass_fds=tuple(keep_fds),
        )  # fmt: skip
        try:
            return process.wait()
        except BaseException:
            _signal_group(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
            raise
        finally:
            _signal_group(process.pid, signal.SIGKILL)  # whatever the run left behind (workers, ranks)


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """An exclusive lock on one run (a file beside its folder), yielding its descriptor.

    `launch` passes the descriptor to the run process: the lock is free only once both the sweep and
    the run are gone, so a second sweep (or a rerun while an old run still lives) waits instead of
    running the cell twice. Without fcntl (not POSIX) there is no such lock.
    """
    if fcntl is None:
        yield None
        return
    path = run_dir.parent / f".{run_dir.name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            tqdm.write(f"{run_dir}: another process is running it (lock {path}); waiting for it")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)


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
    env[FOLLOW_PARENT_ENV] = "1"  # what a run starts (DDP ranks) dies with it, as the run dies with the sweep
    # Each run starts its own W&B service: sharing this process's would keep a killed run's id "in use".
    env.pop("WANDB_SERVICE", None)
    return env


def cell_model(cell: Cell) -> str | None:
    """The model a cell's runs start from: its `model.model` override, else the last config that sets one."""
    if "model.model" in cell.overrides:
        return cell.overrides["model.model"]
    model = None
    for path in [cell.recipe, *cell.configs]:
        model = (read_yaml(path).get("model") or {}).get("model", model)
    return model


def _safety_models(sweep: Sweep) -> list[str]:
    """Models whose safety-tuned version the runs need (`<preset>-safety`, `safety:<model>`, bare `safety`)."""
    found: list[str] = []
    for cell in sweep.cells:
        found += safety_models_needed({"model": {"model": cell_model(cell)}, "set": cell.overrides})
    found += safety_models_needed([step.args for step in sweep.after])
    return list(dict.fromkeys(found))


def _prepare(sweep: Sweep, out_dir: Path, env: dict[str, str]) -> None:
    """Make the safety-tuned models once, before the runs, in a process of their own.

    A run would otherwise make them inside its own model set-up, costing the first run minutes (hours for
    a hub model) and mixing that work into its log.
    """
    models = _safety_models(sweep)
    if not models:
        return
    log = out_dir / "prepare.log"
    tqdm.write(f"preparing safety-tuned models: {', '.join(models)} (made once, then cached)")
    for model in models:
        code_rc = launch([sys.executable, "-m", "safeproj.cli", "prereq", model], log, env)
        if code_rc != 0:
            raise ValueError(f"preparing the safety-tuned {model} failed (exit {code_rc}); see {log}")


def fit_command(cell: Cell, run_dir: Path, overrides: Path) -> list[str]:
    """The `safeproj fit` command line of one run: the recipe, the cell's extra configs, then its overrides."""
    cmd = [sys.executable, "-m", "safeproj.cli", "fit", "--config", str(cell.recipe)]
    for config in cell.configs:
        cmd += ["--config", str(config)]
    return [*cmd, "--config", str(overrides)]


def after_function(command: str) -> Callable[..., Any] | None:
    """The function behind `safeproj <command>`, or None when its module is not available here."""
    module, _, name = COMMANDS.get(command, ":").partition(":")
    if not module or importlib.util.find_spec(module) is None:
        return None
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


@dataclass
class SweepResult:
    """What one invocation did: run counts and labels, after-step labels, and a dry run's planned commands."""

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
    if dry_run:
        todo = _todo(sweep, plan, out, result)
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
        # Under the lock: a list made before it could include runs another sweep was finishing.
        todo = _todo(sweep, plan, out, result)
        with _sigterm_as_interrupt():
            _run_all(sweep, out, todo, plan, max_runs, result, steps)
    finally:
        lock.release()
    return result


def _todo(sweep: Sweep, plan: list, out: Path, result: SweepResult) -> list:
    """The runs of `plan` not done yet (counting the others as skipped), each cell checked."""
    todo = [(cell, seed) for cell, seed in plan if not is_done(out / cell.name / f"seed{seed}")]
    result.skipped = len(plan) - len(todo)
    # Every cell still to run is parsed as its runs will be, so a typo fails now, not hours in.
    for cell in dict.fromkeys(cell.name for cell, _ in todo):
        check_cell(next(c for c in sweep.cells if c.name == cell), sweep, out)
    return todo


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
    with run_lock(run_dir) as fd:
        if is_done(run_dir):  # finished (and indexed) by the process that held the lock
            return True, 0.0
        return _run_locked(sweep, cell, seed, run_dir, out, env, fd)


def _run_locked(
    sweep: Sweep, cell: Cell, seed: int, run_dir: Path, out: Path, env: dict[str, str], fd: int | None
) -> tuple[bool, float]:
    _clear_partial(run_dir)
    overrides = run_dir / "overrides" / f"{cell.recipe.stem}.yaml"
    # Named after the recipe: the CLI takes the W&B group and tag from the last config's name.
    config = run_config(cell, seed, run_dir, sweep.name, sweep.seed_keys)
    overrides.parent.mkdir(parents=True, exist_ok=True)
    write_text(overrides, yaml.safe_dump(config, sort_keys=False))
    start = time.time()
    code = launch(fit_command(cell, run_dir, overrides), run_dir / RUN_LOG, env, keep_fds=() if fd is None else (fd,))
    seconds = time.time() - start
    ok = code == 0 and is_done(run_dir)
    if ok:
        _append_index(
            out,
            {
                "kind": "run",
                "cell": cell.name,
                "seed": seed,
                "dir": str(run_dir.relative_to(out)),
                "recipe": cell.recipe.stem,
                "seconds": round(seconds, 2),
                "finished": _now(),
            },
        )
    elif code == 0:
        with open(run_dir / RUN_LOG, "a") as log:
            log.write(f"\nsafeproj sweep: the run exited 0 but wrote no {SUMMARY_FILE} with status done\n")
    return ok, seconds


def check_after(sweep: Sweep) -> dict[str, tuple[Callable[..., Any], set[str]] | None]:
    """Each after-step's function and parameter names (None: command not available); ValueError on unknown args."""
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
                except Exception:  # one failed analysis must not stop the others
                    traceback.print_exc()
                    ok = False
            seconds = time.time() - start
            if not ok:
                result.failed.append(label)
                tqdm.write(f"after-step {label}: FAILED in {seconds:.1f} s, see {step_dir / RUN_LOG}")
                continue
            record = {
                "kind": "after",
                "name": step.name,
                "command": step.command,
                "seed": seed,
                "cells": step.cells,
                "args": args,
                "status": "done",
                "seconds": round(seconds, 2),
            }
            write_json(step_dir / AFTER_FILE, record, allow_nan=False)
            _append_index(out, {**record, "dir": str(step_dir.relative_to(out)), "finished": _now()})
            result.after_ran.append(label)
            tqdm.write(f"after-step {label}: done in {seconds:.1f} s")
