"""The parent-death signal is set once per process: a run launched by a sweep already has it."""

import signal

import pytest

from safeproj.commands import lifetime


class FakeLibc:
    def __init__(self, current: int):
        self.current = current
        self.sets: list[int] = []

    def prctl(self, option, arg):
        if option == lifetime.PR_GET_PDEATHSIG:
            arg._obj.value = self.current
        else:
            self.sets.append(arg)
        return 0


@pytest.mark.parametrize(("current", "sets"), [(signal.SIGKILL, []), (0, [signal.SIGKILL])])
def test_follow_parent_sets_the_signal_only_when_missing(monkeypatch, current, sets):
    libc = FakeLibc(current)
    monkeypatch.setattr(lifetime.sys, "platform", "linux")
    monkeypatch.setattr(lifetime.ctypes, "CDLL", lambda *args, **kwargs: libc)
    monkeypatch.setattr(lifetime.os, "getppid", lambda: 4242)
    monkeypatch.setenv(lifetime.FOLLOW_PARENT_ENV, "1")
    lifetime.follow_parent_if_asked()
    assert libc.sets == sets
