"""Small factorizations run on one thread unless the user chose a thread count; torch's setting comes back."""

import torch
from threadpoolctl import threadpool_info, threadpool_limits

import safeproj.core.threads as threads
from safeproj.core.basis import build_basis


class Recording:
    """An iterable delta source that notes the thread count while each tensor is being built."""

    def __init__(self):
        self.seen = []
        self.blas = []

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        for i in range(2):
            self.seen.append(torch.get_num_threads())
            self.blas.append(max(pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"))
            yield f"model.layers.{i}.mlp.up_proj.weight", torch.randn(12, 8, generator=g)


def _build(source):
    return build_basis(source, frac=0.5, progress=False)


def test_small_build_uses_one_thread_and_restores_the_setting(monkeypatch):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(threads, "_TORCH_DEFAULT", 2)  # as if 2 were torch's own default
        for name in threads.THREAD_VARIABLES:
            monkeypatch.delenv(name, raising=False)
        source = Recording()
        _build(source)
        assert source.seen == [1, 1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_an_explicit_choice_is_kept(monkeypatch):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(threads, "_TORCH_DEFAULT", 2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        source = Recording()
        _build(source)
        assert source.seen == [2, 2]
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr(threads, "_TORCH_DEFAULT", 8)  # torch.set_num_threads(2) was the user's call
        source = Recording()
        _build(source)
        assert source.seen == [2, 2]
    finally:
        torch.set_num_threads(before)


def test_the_blas_pools_scipy_uses_are_bounded_too(monkeypatch):
    """The eigendecompositions run in SciPy's LAPACK, whose BLAS threads torch.set_num_threads does not set."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(threads, "_TORCH_DEFAULT", 2)
        for name in threads.THREAD_VARIABLES:
            monkeypatch.delenv(name, raising=False)
        with threadpool_limits(limits=2, user_api="blas"):  # as a fresh process on 2 cores starts
            source = Recording()
            _build(source)
            assert source.blas == [1, 1]
            assert max(p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas") == 2
    finally:
        torch.set_num_threads(before)
