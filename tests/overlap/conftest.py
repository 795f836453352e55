"""Fixtures of the overlap tests."""

from __future__ import annotations

import pytest
from helpers.overlap import gaussian, llama_shapes, write_checkpoint

from safeproj.core import spectrum as core_spectrum


@pytest.fixture
def spectrum_calls(monkeypatch):
    """The shapes of every factorization `side_spectrum` is asked for during the test."""
    calls = []
    real = core_spectrum.side_spectrum

    def counting(delta, side="left", method="auto"):
        calls.append(tuple(delta.shape))
        return real(delta, side=side, method=method)

    monkeypatch.setattr(core_spectrum, "side_spectrum", counting)
    return calls


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
