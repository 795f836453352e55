"""Argument checks the projection callbacks share: bad settings fail when the callback is made."""

from __future__ import annotations

from lightning.fabric.utilities.exceptions import MisconfigurationException

from safeproj.core.options import BasisOptions


def basis_options(owner: str, **kwargs) -> BasisOptions:
    """BasisOptions from a callback's arguments; MisconfigurationException naming `owner` if invalid."""
    try:
        return BasisOptions(**kwargs)
    except ValueError as err:
        raise MisconfigurationException(f"{owner}: {err}") from None
