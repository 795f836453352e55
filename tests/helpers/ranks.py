"""Worker scripts of tests/helpers run in processes of their own (one per rank, or one starting the ranks)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

HELPERS = Path(__file__).parent


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def run_helper(script: str, *args, timeout: int = 120) -> subprocess.CompletedProcess:
    """`python tests/helpers/<script> ARGS...` with tests/ importable, its output captured."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HELPERS.parent), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, str(HELPERS / script), *(str(a) for a in args)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def rank_results(out: Path, processes: int) -> list[dict]:
    """What each rank wrote to <out>/rank<r>.pt."""
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(processes)]


def two_rank_results(script: str, out: Path, timeout: int = 120) -> list[dict]:
    """Runs `python tests/helpers/<script> OUT PORT` (the script starts both ranks) and loads what each wrote."""
    result = run_helper(script, out, free_port(), timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return rank_results(out, 2)


def join_group(rank: int, world: int, port: str):
    """Joins this process to a gloo group of `world` on localhost:`port`; the one-dimensional CPU mesh of it."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    return init_device_mesh("cpu", (world,))


def spawn_two(main) -> None:
    """`main(rank, 2, out, port)` on two processes, `out` and `port` from the command line."""
    out, port = sys.argv[1], sys.argv[2]
    torch.multiprocessing.spawn(main, args=(2, out, port), nprocs=2)
