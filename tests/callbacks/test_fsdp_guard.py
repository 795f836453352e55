"""NonFiniteGuard under FSDP2: a NaN in one process's rows stops every process together, with one message."""

import pytest

from helpers.fsdp_guard_worker import WEIGHT
from helpers.ranks import run_helper


@pytest.mark.slow
def test_nan_in_one_shard_stops_both_processes_with_the_same_message(tmp_path):
    want = {
        "start": f"NonFiniteError: non-finite start weight {WEIGHT} at step 0: refusing to train from it",
        "step": f"NonFiniteError: non-finite weight {WEIGHT} after step 2 (training diverged",
    }
    for phase, message in want.items():
        out = tmp_path / phase
        out.mkdir()
        # Bounded: a process left waiting in a collective would end at the workers' 60 s collective timeout.
        result = run_helper("fsdp_guard_worker.py", str(out), phase, timeout=240)
        assert result.returncode != 0 and "NonFiniteError" in result.stderr, result.stderr[-3000:]
        stopped = [(out / f"rank{r}.txt").read_text() for r in range(2)]
        assert stopped[0] == stopped[1] and stopped[0].startswith(message), stopped
