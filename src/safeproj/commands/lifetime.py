"""Processes that end with the process that started them (Linux): a sweep's runs and what those start.

A sweep launches each run with a parent-death signal, so a sweep killed outright (SIGKILL, which it cannot
clean up after) takes its run along. The run's own children, e.g. the DDP ranks Lightning launches, would
still outlive it; the environment variable below asks every safeproj process started under a sweep to set
the same signal on itself at start-up, so the chain sweep → run → ranks ends together.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

PR_SET_PDEATHSIG = 1  # prctl option: a signal the kernel sends a process when its parent dies
PR_GET_PDEATHSIG = 2
FOLLOW_PARENT_ENV = "SAFEPROJ_DIE_WITH_PARENT"


def die_with_parent() -> Callable[[], None] | None:
    """A pre-exec step asking the kernel to SIGKILL the child when this process dies (None off Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before the fork: the child only calls it
    parent = os.getpid()
    return lambda: _kill_with_parent(libc, orphaned=lambda: os.getppid() != parent)


def follow_parent_if_asked() -> None:
    """With SAFEPROJ_DIE_WITH_PARENT=1 (set by a sweep for its runs), die with the parent process.

    A run the sweep launched already got the signal before exec (it survives exec): it is not set twice.
    """
    if os.environ.get(FOLLOW_PARENT_ENV) != "1" or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    current = ctypes.c_int(0)
    if libc.prctl(PR_GET_PDEATHSIG, ctypes.byref(current)) == 0 and current.value == signal.SIGKILL:
        return
    _kill_with_parent(libc, orphaned=lambda: os.getppid() == 1)


def _kill_with_parent(libc, orphaned: Callable[[], bool]) -> None:
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if orphaned():  # the parent died before prctl took effect
        os._exit(1)
