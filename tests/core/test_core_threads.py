"""Small factorizations run on one thread unless the user chose a thread count; torch's setting comes back."""

import torch

import safeproj.core.threads as threads
from safeproj.core.basis import build_basis


class Recording:
    """An iterable delta source that notes the thread count while each tensor is being built."""

    def __init__(self):
        self.seen = []

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        for i in range(2):
            self.seen.append(torch.get_num_threads())
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
