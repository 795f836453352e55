"""Argument checks the projection callbacks share: bad settings fail when the callback is made."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from lightning.fabric.utilities.exceptions import MisconfigurationException

from safeproj.core.options import BasisOptions


@contextmanager
def misconfigured(owner: str) -> Iterator[None]:
    """A ValueError from the core checks inside the block becomes a MisconfigurationException naming `owner`."""
    try:
        yield
    except ValueError as err:
        raise MisconfigurationException(f"{owner}: {err}") from None


def basis_options(owner: str, **kwargs) -> BasisOptions:
    """BasisOptions from a callback's arguments; MisconfigurationException naming `owner` if invalid."""
    with misconfigured(owner):
        return BasisOptions(**kwargs)


def check_option(owner: str, what: str, value: str, allowed: tuple[str, ...]) -> None:
    """MisconfigurationException quoting `what=value` and the allowed values unless `value` is one of them."""
    if value not in allowed:
        raise MisconfigurationException(f"{owner} {what}={value!r}: expected one of {', '.join(allowed)}")
