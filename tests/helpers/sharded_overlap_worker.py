"""Run by tests/core/test_sharded_overlap.py: MSO tables, singular vectors and SafeLoRA products of row-sharded
matrices on two CPU processes (gloo).

Each rank writes to <out>/rank<r>.pt its MSO tables (left and right side), the spectrum and its rows of the
left singular vectors of each Δ, and per tensor and SafeLoRA variant its rows of C·Δ and C·B with the
similarities. Every gather is patched to raise (A of the LoRA cosine is whole on every rank).
"""

import torch
import torch.distributed as dist
from torch.distributed.tensor import Shard, distribute_tensor

from helpers.ranks import join_group, spawn_two
from helpers.sharded_overlap_cases import ETAS, SHAPES, deltas, lora_factors
from helpers.sharded_worker import no_gather
from safeproj.core.overlap import sharded_mso_tables
from safeproj.core.safelora import cosine_of_rows, lora_cosine_of_rows, safelora_projection
from safeproj.core.sharded import row_shard
from safeproj.core.sharded_spectrum import RowFactorization


def main(rank: int, world: int, out: str, port: str) -> None:
    mesh = join_group(rank, world, port)
    run, ref = deltas()
    shards = {name: row_shard(distribute_tensor(run.get(name), mesh, [Shard(0)])) for name in SHAPES}
    results = {"tables": {}, "spectra": {}, "safelora": {}}
    with no_gather():
        for side in ("left", "right"):
            results["tables"][side] = sharded_mso_tables(
                run, lambda name: (shards[name].local, shards[name]), {"ref": ref}, ETAS, side=side
            )
        for name, shard in shards.items():
            factors = RowFactorization(shard.local, shard.rows, shard.sum_over_rows)
            results["spectra"][name] = (shard.start, factors.S, factors.left_rows(min(SHAPES[name])))
            B, A = lora_factors(name)
            b = row_shard(distribute_tensor(B, mesh, [Shard(0)]))
            for variant in ("safelora", "orthonormal"):
                C = safelora_projection(ref.get(name), variant, frac=None, eta=0.9)
                full = C.rows(shard.local, shard.start, shard.sum_over_rows)
                lora = C.rows(b.local, b.start, b.sum_over_rows)
                results["safelora"][name, variant] = {
                    "full": full,
                    "lora": lora,
                    "cosine": cosine_of_rows(shard.local, full, shard.sum_over_rows),
                    "lora_cosine": lora_cosine_of_rows(b.local, lora, A, b.sum_over_rows),
                }
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    spawn_two(main)
