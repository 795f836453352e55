"""Run by tests/core/test_sharded_energy.py: energies and rows of row-sharded tensors on two CPU processes (gloo).

Each rank writes to <out>/rank<r>.pt, per case: its energy row (`energy_of_rows`), the squared norms of X
and W0, W0's rows taken from the whole tensor and from a DTensor copy (`rows_of`), and the rows of a LoRA
product (`lora_update_rows`). Every gather but the LoRA factor's is patched to raise.
"""

import torch
import torch.distributed as dist
from torch.distributed.tensor import Shard, distribute_tensor

from helpers.ranks import join_group, spawn_two
from helpers.sharded_cases import CASES, case_tensors
from helpers.sharded_worker import no_gather
from safeproj.core.sharded import energy_of_rows, lora_update_rows, row_shard, rows_of, squared_norms


def main(rank: int, world: int, out: str, port: str) -> None:
    mesh = join_group(rank, world, port)
    results = {}
    for name in CASES:
        X, W0, entry, _ = case_tensors(name)
        shard = row_shard(distribute_tensor(X, mesh, [Shard(0)]))
        w0 = distribute_tensor(W0, mesh, [Shard(0)])
        with no_gather():
            results[name] = {
                "energy": energy_of_rows(shard.local, shard, entry),
                "norms": squared_norms([shard.local, rows_of(W0, shard)], shard.groups),
                "rows_plain": rows_of(W0, shard).clone(),
                "rows_dtensor": rows_of(w0, shard).clone(),
            }
    g = torch.Generator().manual_seed(3)
    B, A = torch.randn(5, 2, generator=g), torch.randn(2, 6, generator=g)
    b, a = (distribute_tensor(t, mesh, [Shard(0)]) for t in (B, A))
    results["lora"] = lora_update_rows(b, a, 0.5)[0]
    try:
        rows_of(torch.ones(4, 6), shard)
        results["misfit_error"] = ""
    except ValueError as e:
        results["misfit_error"] = str(e)
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    spawn_two(main)
