"""Basis build time on a busy machine: quiet vs with one competing busy process, threads chosen by safeproj
(`safeproj.core.threads`: one thread for small factorizations) against torch's default (one per core,
what an explicit OMP_NUM_THREADS=<cores> keeps). Target: busy / quiet ≤ 1.5 with safeproj's choice.

The delta has SmolLM2-135M's tensor shapes (7 projections per block, random values).

    python benchmarks/basis_threads.py [--blocks 2] [--out benchmarks/results/basis_threads.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from pathlib import Path

import torch

from safeproj.core.basis import build_basis
from safeproj.core.deltas import TensorDelta

SHAPES = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
          "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)}  # fmt: skip


def _busy(stop) -> None:
    """One competing process keeping one core busy (dense matmuls on one thread) until told to stop."""
    torch.set_num_threads(1)
    a = torch.randn(512, 512)
    while not stop.is_set():
        a = torch.tanh(a @ a)


def _delta(blocks: int) -> TensorDelta:
    g = torch.Generator().manual_seed(0)
    start, end = {}, {}
    for block in range(blocks):
        for module, shape in SHAPES.items():
            group = "self_attn" if module.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            name = f"model.layers.{block}.{group}.{module}.weight"
            start[name] = torch.randn(shape, generator=g)
            end[name] = start[name] + torch.randn(shape, generator=g)
    return TensorDelta(end, start)


def _time(delta: TensorDelta, busy: bool) -> float:
    stop = multiprocessing.get_context("spawn").Event()
    competitor = multiprocessing.get_context("spawn").Process(target=_busy, args=(stop,)) if busy else None
    if competitor is not None:
        competitor.start()
        time.sleep(2.0)  # let it get going
    try:
        started = time.perf_counter()
        build_basis(delta, frac=0.25, progress=False)
        return time.perf_counter() - started
    finally:
        if competitor is not None:
            stop.set()
            competitor.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/basis_threads.json")
    args = parser.parse_args()
    delta = _delta(args.blocks)
    rows = []
    load = os.getloadavg()[0]
    for policy in ("safeproj", "torch default"):
        if policy == "torch default":
            os.environ["OMP_NUM_THREADS"] = str(torch.get_num_threads())  # an explicit choice: kept as it is
        quiet, busy = _time(delta, busy=False), _time(delta, busy=True)
        rows.append({"threads": policy, "tensors": len(delta.names()), "quiet_s": round(quiet, 2),
                     "busy_s": round(busy, 2), "busy_over_quiet": round(busy / quiet, 2)})  # fmt: skip
        print(rows[-1], flush=True)
    # Other work on the machine inflates the busy runs beyond the one competitor: recorded beside the rows.
    result = {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_average_before": load,
              "rows": rows}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
