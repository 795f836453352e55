"""EpochShuffle: a seeded shuffle that depends on (seed, epoch) only and can start part-way into an epoch,
in one process or split over data-parallel processes."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator

import torch
from torch.utils.data.distributed import DistributedSampler


class EpochShuffle(DistributedSampler):
    """Indices 0..size-1 in an order fixed by `seed` and the epoch Lightning sets through `set_epoch`.

    A generator seeded once and drawn from epoch after epoch (DataLoader's `shuffle=True`) has no way back
    to epoch e's order after a restart; here each epoch's order is computed afresh, so a resumed run can
    skip exactly the examples it already trained on (`resume`) and then see what an uninterrupted run sees.

    Over several processes (`num_replicas`, `rank`) each takes every num_replicas-th index of the epoch's
    order, the order padded from its start to a multiple of num_replicas, as DistributedSampler splits. Being
    a DistributedSampler, Lightning keeps it instead of swapping in its own, whose epoch order a resumed run
    could only replay from the start.
    """

    def __init__(self, size: int, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        if size < 0:
            raise ValueError(f"EpochShuffle size must be >= 0, got {size}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(
                f"EpochShuffle needs 0 <= rank < num_replicas, got rank={rank}, num_replicas={num_replicas}"
            )
        super().__init__(range(size), num_replicas=num_replicas, rank=rank, shuffle=False, seed=seed)
        self.size = size
        self._resume_epoch: int | None = None
        self._resume_skip = 0

    def resume(self, epoch: int, skip: int) -> None:
        """Leave out the first `skip` indices of this process's share of `epoch` (those trained on before)."""
        self._resume_epoch, self._resume_skip = epoch, max(0, skip)

    def order(self, epoch: int) -> list[int]:
        """The whole epoch's order, before it is split over processes."""
        digest = hashlib.blake2b(f"safeproj.epoch-order:{self.seed}:{epoch}".encode(), digest_size=8).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest, "big") >> 1)
        return torch.randperm(self.size, generator=generator).tolist()

    def share(self, epoch: int) -> list[int]:
        """This process's indices of `epoch`."""
        order = self.order(epoch)
        if self.num_replicas == 1 or not order:
            return order
        total = math.ceil(len(order) / self.num_replicas) * self.num_replicas
        padded = (order * math.ceil(total / len(order)))[:total]
        return padded[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        skip = self._resume_skip if self.epoch == self._resume_epoch else 0
        return iter(self.share(self.epoch)[skip:])

    def __len__(self) -> int:
        # The whole share: Lightning counts batches per epoch from it, resumed or not.
        return math.ceil(self.size / self.num_replicas) if self.size else 0
