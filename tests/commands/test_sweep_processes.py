"""Sweep runs die with the sweep, leave nothing behind, and never run one cell twice at once (Linux)."""

import contextlib
import fcntl
import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from safeproj.commands.lifetime import FOLLOW_PARENT_ENV
from safeproj.commands.sweep import runner
from safeproj.io import write_json

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux only")

# A run that starts a grandchild, writes both process ids to the log, then sleeps.
RUN = (
    "import subprocess, sys, time; "
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
    "print('pids', __import__('os').getpid(), child.pid, flush=True); time.sleep(60)"
)


class _Sweep:
    """A sweep process that launches `cmd` through `runner.launch` and waits for it.

    A fresh interpreter, not a fork of the test process: a fork of a process with other threads (W&B,
    tqdm) inherits their locks and may not get as far as handling a signal.
    """

    def __init__(self, cmd: list[str], log: Path, env: dict[str, str]):
        code = (
            "import json, pathlib, sys; from safeproj.commands.sweep import runner; "
            "cmd, log, env = json.loads(sys.argv[1]); runner.launch(cmd, pathlib.Path(log), env)"
        )
        args = json.dumps([cmd, str(log), env])
        # Ctrl-C must reach it even where this test runs as a background job, which ignores SIGINT.
        restore_sigint = functools.partial(signal.signal, signal.SIGINT, signal.SIG_DFL)
        self.process = subprocess.Popen([sys.executable, "-c", code, args], preexec_fn=restore_sigint)
        self.pid = self.process.pid

    def kill(self) -> None:
        self.process.kill()

    def join(self, timeout: float | None = None) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=timeout)


def _sweep(log: Path, run: str = RUN, env: dict[str, str] | None = None) -> _Sweep:
    return _Sweep([sys.executable, "-c", run], log, {} if env is None else env)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie is dead, only not yet reaped


def _pids(log: Path, deadline: float = 30.0) -> tuple[int, int]:
    end = time.time() + deadline
    while time.time() < end:
        for line in log.read_text().splitlines() if log.exists() else []:
            if line.startswith("pids "):
                run, grandchild = line.split()[1:]
                return int(run), int(grandchild)
        time.sleep(0.05)
    raise AssertionError(f"the run never started: {log.read_text() if log.exists() else ''}")


def _gone(*pids: int, within: float = 5.0) -> bool:
    end = time.time() + within
    while time.time() < end:
        if not any(_alive(pid) for pid in pids):
            return True
        time.sleep(0.05)
    return False


def test_killed_sweep_takes_its_run_along(tmp_path):
    log = tmp_path / "run.log"
    sweep = _sweep(log)
    run, grandchild = _pids(log)
    try:
        sweep.kill()  # SIGKILL: the sweep cleans up nothing
        sweep.join()
        assert _gone(run), "the run outlived the sweep"
    finally:
        for pid in (run, grandchild):  # the grandchild has no parent-death signal of its own
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# As RUN, but the grandchild is a safeproj process (as DDP ranks are) that follows its parent when asked to.
RUN_WITH_RANK = (
    "import os, subprocess, sys, time; "
    "code = 'from safeproj.commands.lifetime import follow_parent_if_asked; follow_parent_if_asked(); "
    "import time; print(\\'ready\\', flush=True); time.sleep(60)'; "
    "child = subprocess.Popen([sys.executable, '-c', code]); "
    "print('pids', os.getpid(), child.pid, flush=True); time.sleep(60)"
)


def test_killed_sweep_takes_the_runs_own_children_along(tmp_path):
    log = tmp_path / "run.log"
    env = {**os.environ, FOLLOW_PARENT_ENV: "1"}  # what the sweep's `_env` sets for every run
    sweep = _sweep(log, RUN_WITH_RANK, env)
    run, rank = _pids(log)
    end = time.time() + 60  # the grandchild sets its parent-death signal at start-up, then says so
    while "ready" not in log.read_text() and time.time() < end:
        time.sleep(0.05)
    try:
        sweep.kill()
        sweep.join()
        assert _gone(run, rank, within=10.0), "the run or the process it started outlived the killed sweep"
    finally:
        for pid in (run, rank):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_runs_are_asked_to_take_their_children_along():
    env = runner._env(SimpleNamespace(env={"X": "1"}))
    assert env[FOLLOW_PARENT_ENV] == "1" and env["X"] == "1"


def test_stopped_sweep_stops_the_run_and_what_it_started(tmp_path):
    log = tmp_path / "run.log"
    sweep = _sweep(log)
    run, grandchild = _pids(log)
    os.kill(sweep.pid, signal.SIGINT)  # Ctrl-C
    sweep.join(timeout=30)
    assert _gone(run, grandchild), "the run or its child outlived the stopped sweep"


def test_a_held_run_lock_makes_the_sweep_wait_and_skip_the_finished_run(tmp_path, monkeypatch):
    launched = []
    monkeypatch.setattr(runner, "launch", lambda cmd, log, env, keep_fds=(): launched.append(cmd) or 1)
    run_dir = tmp_path / "cell" / "seed0"
    lock = tmp_path / "cell" / ".seed0.lock"
    lock.parent.mkdir(parents=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another process runs this cell
    outcome = []
    worker = threading.Thread(
        target=lambda: outcome.append(runner._run_one(None, SimpleNamespace(name="cell"), 0, tmp_path, {}))
    )
    monkeypatch.setattr(runner, "_run_locked", lambda *args: launched.append(args) or (False, 0.0))
    worker.start()
    time.sleep(0.5)
    assert worker.is_alive() and not launched  # waiting for the lock
    write_json(run_dir / "summary.json", {"status": "done"})
    os.close(fd)  # the other process finished the cell
    worker.join(timeout=10)
    assert outcome == [(True, 0.0)] and not launched
