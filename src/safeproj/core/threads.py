"""Threads for many small factorizations: one, unless the user chose, so a busy machine cannot stall them.

torch's default (one thread per core) pays off for large matrices; for the SVDs of a small model's
tensors the threads mostly wait for each other, and with one more busy process on the machine they are
descheduled in turn: building a 210-tensor basis went from 8 s to 158 s on 2 shared cores. The
eigendecompositions run in SciPy's LAPACK, whose BLAS keeps a thread pool of its own that
torch.set_num_threads does not reach, so threadpoolctl bounds that pool too.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from threadpoolctl import threadpool_limits

SMALL_DIM = 1024  # a matrix whose smaller side is at most this is factorized on one thread
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
_TORCH_DEFAULT = torch.get_num_threads()  # as torch starts; a different count later was set on purpose


def user_chose_threads() -> bool:
    """Whether a thread count was set explicitly (environment, or torch.set_num_threads before this point)."""
    return any(os.environ.get(v, "").strip() for v in THREAD_VARIABLES) or torch.get_num_threads() != _TORCH_DEFAULT


@contextmanager
def small_factorization_threads(largest_small_side: int) -> Iterator[int]:
    """Run on one thread (torch's and every BLAS pool loaded in the process) when every matrix is small
    (smaller side ≤ SMALL_DIM) and the user chose nothing; yields the thread count in use and restores the
    settings after."""
    before = torch.get_num_threads()
    if user_chose_threads() or largest_small_side > SMALL_DIM:
        yield before
        return
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield 1
    finally:
        torch.set_num_threads(before)
