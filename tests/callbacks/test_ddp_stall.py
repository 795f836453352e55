"""A stalled DDP rank ends the run within the collective timeout instead of hanging it (CPU, gloo)."""

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

HELPERS = Path(__file__).parents[1] / "helpers"


@pytest.mark.slow
def test_stalled_rank_ends_the_run_within_the_timeout():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HELPERS.parent), os.environ.get("PYTHONPATH", "")])}
    # 20 s: the timeout also bounds rank 1's start-up rendezvous, which takes seconds on a loaded machine.
    process = subprocess.Popen([sys.executable, str(HELPERS / "ddp_stall_worker.py"), "20"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    stalled_at, output = None, []
    try:
        for line in process.stdout:
            output.append(line)
            if "stalling rank 1" in line:
                stalled_at = time.time()
                stalled_pid = int(re.search(r"pid (\d+)", line).group(1))
                break
        assert stalled_at is not None, "".join(output[-30:])
        code = process.wait(timeout=120)
        took = time.time() - stalled_at
    finally:
        process.kill()
        if stalled_at is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stalled_pid, signal.SIGKILL)
    assert code != 0 and took < 60, f"exit {code} after {took:.0f} s"
    print(f"rank 0 ended {took:.1f} s after the stall")
