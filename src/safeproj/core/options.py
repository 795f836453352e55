"""The choices every subspace is built from, defined once: names, defaults, and their checks."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal, get_args

Keep = Literal["parallel", "orthogonal"]
Selection = Literal["top", "random-k", "random"]
Side = Literal["left", "right"]
BasisSide = Literal["left", "right", "both"]

KEEPS: tuple[str, ...] = get_args(Keep)
SELECTIONS: tuple[str, ...] = get_args(Selection)
SIDES: tuple[str, ...] = get_args(Side)
BASIS_SIDES: tuple[str, ...] = get_args(BasisSide)

FRACS = (0.01, 0.25, 0.5, 0.75, 0.99)  # the paper's rank fractions
ETAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # energy shares of the MSO grid
DEFAULT_FRAC = 0.5


def check_choice(what: str, value: str, allowed: tuple[str, ...]) -> None:
    """ValueError naming `what` unless `value` is one of `allowed`."""
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(allowed)}")


def check_fraction(what: str, value: float) -> None:
    """ValueError unless `value` is a number in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{what} must be in (0, 1], got {value!r}")


def check_fractions(what: str, values) -> list[float]:
    """A grid of `what` values (fracs, etas), sorted and de-duplicated; ValueError naming a value outside (0, 1]."""
    values = list(values)
    if not values:
        raise ValueError(f"no {what} given: expected at least one value in (0, 1]")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise ValueError(f"{what}={value!r} is outside (0, 1]")
    return sorted({float(v) for v in values})


def check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
        raise ValueError(f"seed must be an integer in [0, 2**31), got {seed!r}")


@dataclass
class BasisOptions:
    """How a basis is built from a delta.

    k per matrix is round(frac·min(m, n)) or the fewest directions holding η of ‖Δ‖_F²: give at most
    one of `frac` and `eta` (neither means frac = 0.5).
    """

    frac: float | None = None
    eta: float | None = None
    selection: Selection = "top"
    side: BasisSide = "left"
    seed: int = 0
    include: list[str] | None = None
    exclude: list[str] | None = None

    def __post_init__(self) -> None:
        if self.frac is not None and self.eta is not None:
            raise ValueError(f"give frac or eta, not both (frac={self.frac!r}, eta={self.eta!r})")
        if self.frac is None and self.eta is None:
            self.frac = DEFAULT_FRAC
        if self.frac is not None:
            check_fraction("frac", self.frac)
        else:
            check_fraction("eta", self.eta)
        check_choice("selection", self.selection, SELECTIONS)
        check_choice("side", self.side, BASIS_SIDES)
        check_seed(self.seed)
        for what in ("include", "exclude"):
            value = getattr(self, what)
            if isinstance(value, str):
                setattr(self, what, [value])

    def as_dict(self) -> dict:
        return asdict(self)
