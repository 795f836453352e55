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
FOLLOW_PARENT_ENV = "SAFEPROJ_DIE_WITH_PARENT"


def die_with_parent() -> Callable[[], None] | None:
    """A pre-exec step asking the kernel to SIGKILL the child when this process dies (None off Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before the fork: the child only calls it
    parent = os.getpid()

    def set_up() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return set_up


def follow_parent_if_asked() -> None:
    """With SAFEPROJ_DIE_WITH_PARENT=1 (set by a sweep for its runs), die with the parent process."""
    if os.environ.get(FOLLOW_PARENT_ENV) != "1" or not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # orphaned before prctl took effect
        os._exit(1)
