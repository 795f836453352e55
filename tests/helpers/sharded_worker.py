"""Run by tests/core/test_sharded.py: row-sharded projections on two CPU processes (gloo).

Each rank writes {case: (start, local rows)} to <out>/rank<r>.pt, and the error raised for a tensor
sharded on columns. Every gather is patched to raise while projecting: the projection must not gather.
"""

from contextlib import contextmanager
from unittest import mock

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from helpers.ranks import join_group, spawn_two
from helpers.sharded_cases import CASES, case_tensors
from safeproj.core.sharded import project_rows_in_place, project_shard, row_shard

GATHERS = ["all_gather", "all_gather_into_tensor", "all_gather_object", "gather", "_all_gather_base"]


@contextmanager
def no_gather():
    def refuse(*args, **kwargs):
        raise AssertionError("projection gathered a tensor")

    with (
        mock.patch.multiple(dist, **{name: refuse for name in GATHERS if hasattr(dist, name)}),
        mock.patch.object(DTensor, "full_tensor", refuse),
        mock.patch.object(DTensor, "redistribute", refuse),
    ):
        yield


def main(rank: int, world: int, out: str, port: str) -> None:
    mesh = join_group(rank, world, port)
    results = {}
    for name in CASES:
        X, W0, entry, keep = case_tensors(name)
        x = distribute_tensor(X, mesh, [Shard(0)])
        w0 = distribute_tensor(W0, mesh, [Shard(0)]).to_local().clone()
        with no_gather():
            projected = project_shard(x, entry, keep)
            shard = row_shard(x)
            w = (shard.local + w0).clone()  # W = W0 + X, projected in place to W0 + P·X
            if (entry.left is None) != (entry.right is None):
                project_rows_in_place(w, w0, shard.start, entry, keep, shard.sum_over_rows)
            else:
                w = w0 + projected
        results[name] = (shard.start, projected, w - w0)
    try:
        row_shard(distribute_tensor(torch.ones(4, 6), mesh, [Shard(1)]))
        results["column_error"] = ""
    except ValueError as e:
        results["column_error"] = str(e)
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    spawn_two(main)
