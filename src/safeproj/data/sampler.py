"""EpochShuffle: a seeded shuffle that depends on (seed, epoch) only and can start part-way into an epoch."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochShuffle(Sampler[int]):
    """Indices 0..size-1 in an order fixed by `seed` and the epoch Lightning sets through `set_epoch`.

    A generator seeded once and drawn from epoch after epoch (DataLoader's `shuffle=True`) has no way back
    to epoch e's order after a restart; here each epoch's order is computed afresh, so a resumed run can
    skip exactly the examples it already trained on (`resume`) and then see what an uninterrupted run sees.
    """

    def __init__(self, size: int, seed: int) -> None:
        if size < 0:
            raise ValueError(f"EpochShuffle size must be >= 0, got {size}")
        self.size, self.seed = size, seed
        self.epoch = 0
        self._resume_epoch: int | None = None
        self._resume_skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, epoch: int, skip: int) -> None:
        """Leave out the first `skip` indices of `epoch` (the ones trained on before the checkpoint)."""
        self._resume_epoch, self._resume_skip = epoch, max(0, skip)

    def order(self, epoch: int) -> list[int]:
        digest = hashlib.blake2b(f"safeproj.epoch-order:{self.seed}:{epoch}".encode(), digest_size=8).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest, "big") >> 1)
        return torch.randperm(self.size, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        skip = self._resume_skip if self.epoch == self._resume_epoch else 0
        return iter(self.order(self.epoch)[skip:])

    def __len__(self) -> int:
        # The whole epoch: Lightning counts batches per epoch from it, resumed or not.
        return self.size
