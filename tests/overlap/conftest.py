"""Fixtures of the overlap tests."""

from __future__ import annotations

import pytest
import torch
from overlap_helpers import gaussian, llama_shapes, write_checkpoint


@pytest.fixture(autouse=True)
def _one_thread():
    # The matrices here are tiny: thread start-up costs more than it saves, and on a shared machine
    # busy-waiting threads slow every test down many times over.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def checkpoint_pair(tmp_path):
    """Specs of two deltas `A,BASE` and `B,BASE` over two Llama-shaped layers (random updates)."""
    shapes = llama_shapes()
    base = gaussian(shapes, seed=0, scale=0.02)
    tuned = {}
    for label, seed in (("a", 1), ("b", 2)):
        update = gaussian(shapes, seed=seed, scale=1e-2)
        tuned[label] = write_checkpoint(tmp_path / label, {n: base[n] + update[n] for n in shapes})
    base_dir = write_checkpoint(tmp_path / "base", base)
    return f"{tuned['a']},{base_dir}", f"{tuned['b']},{base_dir}"
