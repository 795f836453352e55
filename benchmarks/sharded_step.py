"""The sharded projection's share of an FSDP2 optimizer step on 2 CPU processes (gloo), in one run.

Each process shards the model as `SafeprojLM.configure_model` does (`shard_blocks_and_root`: every decoder
block, then the root), then optimizer steps are timed with and without OnlineProjection's per-step work
(`core.online.StepProjector.project_weights`: the left side's k×n all-reduce per tensor and each rank's
own rows) in alternation, so drift in machine speed hits both alike. Rank zero writes the medians: the
step without projection, with it, their ratio, the projection alone and its share of the step, beside
the FLOP floor 2·min(k, m−k)/(3T) (T = tokens per optimizer step over both processes). The basis is the
update of a perturbed copy (`projection.perturbed_copy`), side left, keep orthogonal.

    python benchmarks/sharded_step.py [--models tiny smollm2-135m] [--out benchmarks/results/sharded_step.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh

from projection import alternate, perturbed_copy, timing_row  # the sibling script: benchmarks/ is on the path
from safeproj.core.basis import build_basis
from safeproj.core.deltas import CheckpointDelta
from safeproj.core.online import StepProjector
from safeproj.core.targets import find_targets
from safeproj.io import write_json
from safeproj.model.loading import load_model, resolve
from safeproj.model.module import shard_blocks_and_root

PROCESSES = 2


def _worker(rank: int, args: dict, port: int, out: str) -> None:
    torch.set_num_threads(1)  # one core per process: two processes fill the 2-core machine
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=PROCESSES)
    try:
        mesh = init_device_mesh("cpu", (PROCESSES,))
        model, _ = load_model(args["model"])
        model.train()
        basis = build_basis(CheckpointDelta(args["tuned"], args["base"]), frac=args["frac"], progress=False)
        shard_blocks_and_root(model, mesh)
        projector = StepProjector(basis, "orthogonal", find_targets(model, basis))
        projector.keep_start(resumed=False, start_dir=None)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        g = torch.Generator().manual_seed(rank)
        ids = torch.randint(10, model.config.vocab_size, (args["batch"], args["length"]), generator=g)

        def step(project: bool) -> float:
            dist.barrier()
            started = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            if project:
                projector.project_weights()
            dist.barrier()
            return time.perf_counter() - started

        def projection_alone() -> float:
            dist.barrier()
            started = time.perf_counter()
            projector.project_weights()
            dist.barrier()
            return time.perf_counter() - started

        step(False), step(True)  # warm-up
        plain, projected = alternate(step, args["pairs"])
        alone = [projection_alone() for _ in range(args["pairs"])]
        if rank == 0:
            tokens = PROCESSES * args["batch"] * args["length"]
            timing = timing_row(plain, projected, alone, basis, tokens)
            row = {
                "model": args["model"],
                "processes": PROCESSES,
                "frac": args["frac"],
                **timing,
                "pairs": args["pairs"],
            }
            Path(out).write_text(json.dumps(row))
    finally:
        dist.destroy_process_group()


def measure(model: str, frac: float, batch: int, length: int, pairs: int, tmp: Path, port: int) -> dict:
    base = resolve(model)
    tuned = perturbed_copy(base, tmp / f"tuned-{model}")
    args = {"model": model, "base": base, "tuned": str(tuned), "frac": frac, "batch": batch, "length": length,
            "pairs": pairs}  # fmt: skip
    out = tmp / f"row-{model}-{frac}.json"
    mp.start_processes(_worker, args=(args, port, str(out)), nprocs=PROCESSES, start_method="spawn")
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2-135m"])
    parser.add_argument("--fracs", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--batch", type=int, default=2, help="sequences per process and step")
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--out", default="benchmarks/results/sharded_step.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for i, model in enumerate(args.models):
            for j, frac in enumerate(args.fracs):
                row = measure(model, frac, args.batch, args.length, args.pairs, Path(d), port=29600 + 10 * i + j)
                rows.append(row)
                print(json.dumps(row), flush=True)
    write_json(args.out, {"rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
