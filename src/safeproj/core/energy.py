"""How much of an update a subspace keeps: the frac × selection grid of subspaces, and energy pooling.

The grid gives, for a rank fraction and a selection ("top", "random-k", "random"), the kept subspace
of one tensor of a reference: exactly the subspace `core.basis.build_basis` keeps with those settings,
taken from the tensor's spectrum in a SpectrumCache (one SVD per tensor and side, and for "random" one
Gaussian SVD per tensor, shared by every frac). An update's energy in a subspace is ‖PΔ‖² beside
‖Δ‖² and the share a random subspace keeps on average; pooled over tensors, the share is
Σ kept / Σ total, the energy-weighted mean of the tensors' shares. PosthocProjection, `safeproj
overlap --energy` and SubspaceDrift all measure through here.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor
from tqdm.auto import tqdm

from safeproj.core.factors import BasisEntry, Factor
from safeproj.core.names import parse_name
from safeproj.core.options import (
    BASIS_SIDES,
    FRACS,
    SELECTIONS,
    BasisSide,
    Side,
    check_choice,
    check_fractions,
    check_seed,
)
from safeproj.core.projector import energy_share, random_share
from safeproj.core.spectra import SpectrumCache, Subspaces, matrix_shape, shared_names, source_shape
from safeproj.core.spectrum import as_matrix, k_for_frac, select_vectors, squared_norm


@dataclass(frozen=True)
class Variant:
    """One point of the grid: keep k = round(frac·min(m, n)) directions chosen by `selection`."""

    frac: float
    selection: str

    @property
    def name(self) -> str:
        return f"{self.selection}@{self.frac:g}"


def check_grid(fracs: Iterable[float], selections: Iterable[str]) -> tuple[list[float], list[str]]:
    """Sorted fracs in (0, 1] and known selections; ValueError naming the first bad value."""
    fracs, selections = check_fractions("frac", fracs), list(selections)
    if not selections:
        raise ValueError(f"no selection given: expected some of {', '.join(SELECTIONS)}")
    for selection in selections:
        check_choice("selection", selection, SELECTIONS)
    return fracs, selections


class SubspaceGrid:
    """The frac × selection subspaces of a reference (a delta, or a basis artifact with spectra), per tensor.

    Args:
        source: the reference.
        names: tensors whose spectra are computed now (with a progress bar); others when first asked for.
        side: "left", "right" or "both" (each side from its own SVD).
        seed: seed of the random selections (per tensor, as in `build_basis`).
        cache_dir: a folder private to this grid: spectra are kept there, not in memory, once a tensor
            is released, so a caller releasing each tensor after use holds one tensor's vectors at a time.
        cache: a SpectrumCache of one side to read from instead (e.g. one an MSO table shares).
    """

    def __init__(
        self,
        source: Subspaces,
        names: Sequence[str] = (),
        side: BasisSide = "left",
        seed: int = 0,
        progress: bool = True,
        cache_dir: str | os.PathLike | None = None,
        cache: SpectrumCache | None = None,
    ):
        check_choice("side", side, BASIS_SIDES)
        check_seed(seed)
        self.source, self.seed = source, seed
        if cache is not None:
            if cache.side != side:
                raise ValueError(f"cache holds {cache.side}-side spectra but side={side!r}")
            self.caches = {side: cache}
        else:
            sides = ("left", "right") if side == "both" else (side,)
            folder = Path(cache_dir) if cache_dir is not None else None
            self.caches = {s: SpectrumCache(side=s, cache_dir=folder, by_content=False) for s in sides}
        self.on_disk = cache is None and cache_dir is not None
        available = set(source.names())
        missing = [n for n in names if n not in available]
        if missing:
            raise ValueError(f"reference subspace has no tensor {missing[0]}")
        for name in tqdm(names, desc="reference spectra", disable=not progress):
            for c in self.caches.values():
                c.get(source, name)
            if self.on_disk:
                self.release(name)

    def entry(self, name: str, variant: Variant) -> BasisEntry:
        """The kept subspace of tensor `name` at one grid point (its vectors, never their complement)."""
        m, n = shape = matrix_shape(source_shape(self.source, name))
        k = k_for_frac(variant.frac, m, n)
        factors = {}
        for side, cache in self.caches.items():
            if variant.selection == "random":  # the top k of the Gaussian select_vectors would draw
                Q = select_vectors(cache.gaussian(name, shape, self.seed), k, "top", name=name)
            else:
                Q = self._select(name, *cache.get(self.source, name), k, variant)
            factors[side] = Factor(Q, complement=False)
        return BasisEntry(
            name=name,
            shape=shape,
            left=factors.get("left"),
            right=factors.get("right"),
            energy_kept=math.nan,
            energy_total=math.nan,
            spectrum=None,
        )

    def _select(self, name: str, Q: Tensor, S: Tensor, k: int, variant: Variant) -> Tensor:
        # A basis artifact stores only some top vectors: say so rather than pick from too few.
        if variant.selection == "top" and k > Q.shape[1]:
            raise ValueError(
                f"{name}: frac={variant.frac:g} needs {k} directions but only {Q.shape[1]} are stored; "
                "use the delta itself or a basis built with a larger frac"
            )
        if variant.selection == "random-k" and Q.shape[1] < len(S):
            raise ValueError(f"{name}: random-k needs every singular vector; the basis stores {Q.shape[1]}")
        return select_vectors(Q, k, variant.selection, seed=self.seed, name=name)

    def release(self, name: str) -> None:
        """Let go of a tensor's vectors in memory (read back from disk, or recomputed, when asked again)."""
        for cache in self.caches.values():
            cache.release(name)


def energy_row(update: Tensor, entry: BasisEntry) -> dict:
    """One tensor's update in one subspace: kept ‖PΔ‖², total ‖Δ‖², their share, and a random subspace's share.

    A zero update has no share (NaN) and keeps nothing, so it does not move a pool.
    """
    total = squared_norm(update)
    share = energy_share(update, entry) if total > 0 else math.nan
    return {
        "kept": share * total if total > 0 else 0.0,
        "total": total,
        "share": share,
        "random_share": random_share(entry),
    }


def pool(rows: Sequence[dict]) -> dict:
    """Σ kept / Σ total over tensors; the random share weighted by energy alike (its plain mean while no
    tensor has energy), when every row carries one."""
    kept = sum(r["kept"] for r in rows)
    total = sum(r["total"] for r in rows)
    pooled = {"kept": kept, "total": total, "share": kept / total if total > 0 else math.nan, "tensors": len(rows)}
    if rows and all("random_share" in r for r in rows):
        if total > 0:
            pooled["random_share"] = sum(r["random_share"] * r["total"] for r in rows) / total
        else:
            pooled["random_share"] = sum(r["random_share"] for r in rows) / len(rows)
    return pooled


def energy_retained(
    basis_source: Subspaces,
    update_source,
    fracs: Sequence[float] = FRACS,
    selections: Sequence[str] = SELECTIONS,
    seed: int = 0,
    side: Side = "left",
    cache: SpectrumCache | None = None,
    progress: bool = False,
) -> list[dict]:
    """Share of ‖Δ_T‖_F² kept by P_k (k from frac of the basis delta's spectrum), per selection.

    Rows per tensor (scope "tensor") and pooled over tensors (scope "pooled", Σ‖PΔ‖² / Σ‖Δ‖²):
    name, layer, module, frac, selection, k, d, kept, total, share, random_share (the expected share
    of a uniformly random k-dimensional subspace). The basis spectra are computed once per tensor.
    """
    fracs, selections = check_grid(fracs, selections)
    grid = SubspaceGrid(basis_source, side=side, seed=seed, cache=cache or SpectrumCache(side=side))
    names = shared_names(update_source, {"": basis_source})
    rows: list[dict] = []
    for name in tqdm(names, desc="energy retained", unit="tensor", disable=not progress):
        try:
            update = as_matrix(update_source.get(name))
            layer, module = parse_name(name)
            for frac in fracs:
                for selection in selections:
                    entry = grid.entry(name, Variant(frac, selection))
                    factor = entry.left or entry.right
                    where = {"scope": "tensor", "name": name, "layer": layer, "module": module}
                    grid_point = {"frac": frac, "selection": selection, "k": factor.k, "d": factor.dim}
                    rows.append({**where, **grid_point, **energy_row(update, entry)})
        finally:
            grid.release(name)
    return rows + pool_energy(rows)


def pool_energy(rows: Sequence[dict]) -> list[dict]:
    """Pooled rows per (frac, selection), in selection then frac order."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        if row["scope"] == "tensor":
            groups[(row["frac"], row["selection"])].append(row)
    order = {s: i for i, s in enumerate(SELECTIONS)}
    pooled = []
    for frac, selection in sorted(groups, key=lambda key: (order[key[1]], key[0])):
        p = pool(groups[(frac, selection)])
        where = {"scope": "pooled", "name": f"pooled ({p['tensors']} tensors)", "layer": None, "module": None}
        grid_point = {"frac": frac, "selection": selection, "k": None, "d": None}
        pooled.append({**where, **grid_point, **{key: p[key] for key in ("kept", "total", "share", "random_share")}})
    return pooled
