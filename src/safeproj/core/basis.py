"""Projection bases: per tensor, the kept singular subspace of a delta, saved as one safetensors file.

Each side keeps either the k kept directions U_k or an orthonormal basis U⊥ of their complement,
whichever has fewer columns, so a basis never takes more bytes than the weights it covers (at most
half for square matrices). The projector is the same either way: P = U_k U_kᵀ = I − U⊥U⊥ᵀ.
The left subspace of an m×n delta lives in R^m and the right one in R^n; for a tall matrix
(m > n) at most n of the m left directions carry energy, so k ≤ n there.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from safeproj import __version__
from safeproj.core.deltas import DeltaSource
from safeproj.core.factors import BasisEntry, Factor
from safeproj.core.options import BASIS_SIDES, SELECTIONS, BasisOptions, check_fraction
from safeproj.core.projector import energy_share
from safeproj.core.spectrum import (
    AUTO_METHOD,
    METHODS,
    Factorization,
    all_finite,
    as_matrix,
    energy_spectrum,
    gaussian_matrix,
    k_for_energy,
    k_for_frac,
    orthogonal_complement,
    pick_indices,
    squared_norm,
    tensor_seed,
)
from safeproj.core.threads import small_factorization_threads
from safeproj.io import atomic_file

FORMAT = "safeproj.basis"
FORMAT_VERSION = 1
# A stored factor must be orthonormal to this (max |(QᵀQ − I)x| over a few fixed random probes x): float32
# round-off stays far below it; a flipped exponent or sign bit does not.
ORTHONORMAL_TOL = 1e-3
_PROBES = 8


@dataclass
class Basis:
    """name → BasisEntry, plus `meta` (settings, source description, per-tensor k and energy)."""

    entries: dict[str, BasisEntry]
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def __getitem__(self, name: str) -> BasisEntry:
        return self.entries[name]

    def names(self) -> list[str]:
        return list(self.entries)

    def nbytes(self) -> int:
        """Bytes of all stored tensors (factors and spectra)."""
        return sum(e.nbytes() for e in self.entries.values())

    def validate(self, shapes: Mapping[str, tuple]) -> None:
        """Raise ValueError naming the first tensor missing from `shapes` or of another shape."""
        for name, e in self.entries.items():
            if name not in shapes:
                raise ValueError(f"basis tensor {name!r} is not in the model (basis built for another model?)")
            if tuple(shapes[name]) != tuple(e.shape):
                raise ValueError(
                    f"basis tensor {name!r} has shape {tuple(e.shape)} but the model's is {tuple(shapes[name])}"
                )

    def save(self, path: str | os.PathLike) -> None:
        """Write one .safetensors file atomically."""
        path = Path(path)
        tensors: dict[str, Tensor] = {}
        index = {}
        for name, e in self.entries.items():
            for side, f in e.factors().items():
                tensors[f"{name}::{side}"] = f.Q.detach().float().cpu().contiguous()
            if e.spectrum is not None:
                tensors[f"{name}::spectrum"] = e.spectrum.detach().float().cpu().contiguous()
            index[name] = {
                "shape": list(e.shape),
                "left_complement": None if e.left is None else e.left.complement,
                "right_complement": None if e.right is None else e.right.complement,
                "energy_kept": e.energy_kept,
                "energy_total": e.energy_total,
            }
        metadata = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "meta": json.dumps(self.meta),
            "entries": json.dumps(index),
            # Checked at load: a file corrupted on disk is refused rather than projected with.
            "digests": json.dumps({key: tensor_digest(t) for key, t in tensors.items()}),
        }
        with atomic_file(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Basis:
        """Read a basis written by `save`; ValueError naming the file if it is missing or not a basis."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"basis file {path} does not exist")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                header = f.metadata() or {}
                if header.get("format") != FORMAT:
                    raise ValueError("it has no safeproj basis header")
                if int(header.get("format_version", -1)) > FORMAT_VERSION:
                    raise ValueError(f"format version {header['format_version']} is newer than this safeproj")
                meta = json.loads(header["meta"])
                index = json.loads(header["entries"])
                # Files written before digests existed have none; the orthonormality check still applies.
                digests = json.loads(header["digests"]) if "digests" in header else None
                read = partial(_checked_tensor, f, digests)
                entries = {name: _read_entry(f, read, name, spec) for name, spec in index.items()}
        except Exception as err:  # safetensors, JSON and layout errors all mean the same thing here
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"cannot read basis file {path}: {reason}") from None
        return cls(entries, meta)


def tensor_digest(tensor: Tensor) -> str:
    """A content hash of a CPU tensor's bytes (dtype and shape included)."""
    h = hashlib.blake2b(f"{tensor.dtype}:{tuple(tensor.shape)}:".encode(), digest_size=16)
    h.update(tensor.contiguous().view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return h.hexdigest()


def orthonormality_error(Q: Tensor) -> float:
    """max |(QᵀQ − I)x| over fixed random probes x: O(d·k) where the exact QᵀQ would cost O(d·k²)."""
    if Q.shape[1] == 0:
        return 0.0
    x = torch.randn(Q.shape[1], _PROBES, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    Q = Q.double()
    return float((Q.T @ (Q @ x) - x).abs().max())


def _checked_tensor(f, digests: dict | None, key: str) -> Tensor:
    tensor = f.get_tensor(key)
    if digests is not None and digests.get(key) != tensor_digest(tensor):
        raise ValueError(f"tensor {key} does not match its digest (the file is corrupt)")
    return tensor


def _read_entry(f, read, name: str, spec: dict) -> BasisEntry:
    shape = tuple(int(s) for s in spec["shape"])
    if len(shape) not in (1, 2):
        raise ValueError(f"tensor {name!r} has shape {shape}, expected 1-D or 2-D")
    dims = {"left": shape[0], "right": shape[1] if len(shape) == 2 else 1}
    factors = {}
    for side in ("left", "right"):
        complement = spec[f"{side}_complement"]
        if complement is None:
            factors[side] = None
            continue
        Q = read(f"{name}::{side}")
        if Q.ndim != 2 or Q.shape[0] != dims[side] or not all_finite(Q):
            raise ValueError(f"factor {name}::{side} has shape {tuple(Q.shape)}, expected {dims[side]} rows")
        error = orthonormality_error(Q)
        if not error <= ORTHONORMAL_TOL:
            raise ValueError(f"factor {name}::{side} is not orthonormal (|QᵀQ − I| ≈ {error:.1e} > {ORTHONORMAL_TOL})")
        factors[side] = Factor(Q, bool(complement))
    if factors["left"] is None and factors["right"] is None:
        raise ValueError(f"tensor {name!r} has no factor")
    spectrum = read(f"{name}::spectrum") if f"{name}::spectrum" in f.keys() else None
    return BasisEntry(
        name=name,
        shape=shape,
        left=factors["left"],
        right=factors["right"],
        energy_kept=float(spec["energy_kept"]),
        energy_total=float(spec["energy_total"]),
        spectrum=spectrum,
    )


def _factor(fac: Factorization, side: str, idx: Tensor, last: bool) -> Factor:
    """The kept directions idx of one side, or their complement, whichever has fewer columns.

    `last`: no other side follows, so the factorization may free its vectors as it goes.
    """
    d, k, r = fac.dim(side), len(idx), min(fac.shape)
    if k <= d - k:
        return Factor(fac.vectors(side, idx, release=last), complement=False)
    if r == d:  # this side's r vectors span R^d: the unpicked ones span the complement
        rest = torch.ones(d, dtype=torch.bool)
        rest[idx] = False
        return Factor(fac.vectors(side, rest.nonzero().flatten(), release=last), complement=True)
    return Factor(orthogonal_complement(fac.vectors(side, idx, release=last)).contiguous(), complement=True)


def _loaders(source):
    """(name, load) per tensor, load() giving Δ. A DeltaSource computes Δ anew on each call, so no
    one holds it between uses; for any other iterable of (name, Δ) the loader keeps Δ."""
    if isinstance(source, DeltaSource):
        for name in source.names():
            yield name, partial(source.get, name)
    else:
        for name, delta in source:
            yield name, (lambda delta=delta: delta)


def build_basis(
    source,
    *,
    frac: float | None = None,
    eta: float | None = None,
    selection: str = "top",
    side: str = "left",
    seed: int = 0,
    keep_spectrum: bool = True,
    progress: bool = True,
    method: str = "auto",
) -> Basis:
    """Per tensor of `source` (a DeltaSource or any iterable of (name, Δ)), keep k directions.

    k = round(frac·min(m, n)) or the fewest directions holding η of ‖Δ‖_F² (exactly one of frac
    and eta). `selection`: "top" (largest singular values), "random-k" (k random singular
    vectors of the same SVD) or "random" (top-k of a seeded Gaussian matrix of the same shape).
    `side`: "left" (output space, P·Δ), "right" (input space, Δ·P) or "both" (P_L·Δ·P_R); for
    "both", k is used on each side. Streams one tensor at a time.
    """
    if (frac is None) == (eta is None):
        raise ValueError(f"give exactly one of frac and eta (got frac={frac!r}, eta={eta!r})")
    if selection not in SELECTIONS:
        raise ValueError(f"unknown selection {selection!r}; expected one of {', '.join(SELECTIONS)}")
    if side not in BASIS_SIDES:
        raise ValueError(f"unknown side {side!r}; expected one of {', '.join(BASIS_SIDES)}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    check_fraction("frac" if frac is not None else "eta", frac if frac is not None else eta)
    tensor_seed(seed, "")  # range check
    left, right = side in ("left", "both"), side in ("right", "both")

    entries: dict[str, BasisEntry] = {}
    per_tensor: dict[str, dict] = {}
    zero: list[str] = []  # tensors whose Δ is exactly zero (an untouched norm, a frozen embedding)
    total = len(source) if hasattr(source, "__len__") else None
    # Many small SVDs: threads chosen on purpose (safeproj.core.threads), not left to oversubscribe.
    with small_factorization_threads(_largest_small_side(source)):
        for name, load in tqdm(_loaders(source), total=total, desc="basis", unit="tensor", disable=not progress):
            if selection == "random":
                delta = load()
                shape, M = tuple(delta.shape), as_matrix(delta)
                S, total_energy = energy_spectrum(M), squared_norm(M)
                m, n = M.shape
                del delta, M
            else:
                fac = Factorization(load, method)  # reads Δ again when it needs it
                S, total_energy, (m, n), shape = fac.S, fac.total, fac.shape, fac.source_shape
            if S[0] == 0:  # no directions to choose from: left out, so projections leave its update alone
                zero.append(name)
                continue
            k = k_for_frac(frac, m, n) if frac is not None else k_for_energy(S, eta)
            if selection == "random":
                fac = Factorization(gaussian_matrix((m, n), seed, name), method)
                idx = pick_indices("top", min(m, n), k, name=name)
            else:
                idx = pick_indices(selection, S.numel(), k, seed, name)
            entry = BasisEntry(
                name=name,
                shape=shape,
                left=_factor(fac, "left", idx, last=not right) if left else None,
                right=_factor(fac, "right", idx, last=True) if right else None,
                energy_kept=0.0,
                energy_total=total_energy,
                spectrum=S if keep_spectrum else None,
            )
            if selection == "random":  # Gaussian directions: measure what they keep of Δ
                del fac
                entry.energy_kept = energy_share(load(), entry)
            else:  # Δ's own singular directions keep their σ², on one side or both
                entry.energy_kept = fac.energy(idx) / total_energy
                del fac
            entries[name] = entry
            per_tensor[name] = {"k": k, "energy_kept": entry.energy_kept, "energy_total": entry.energy_total}

    if not entries:
        if zero:
            raise ValueError(f"every delta is zero ({len(zero)} tensors, first {zero[0]!r}): check the source")
        raise ValueError("the delta source yielded no tensors")
    if zero:
        warnings.warn(
            f"{len(zero)} tensors have a zero delta and are left out of the basis (first {zero[0]!r})", stacklevel=2
        )
    meta = {
        "safeproj_version": __version__,
        "side": side,
        "selection": selection,
        "frac": frac,
        "eta": eta,
        "seed": seed,
        "method": AUTO_METHOD if method == "auto" else method,
        "source": source.describe() if hasattr(source, "describe") else {"kind": type(source).__name__},
        "tensors": per_tensor,
        "zero_delta": zero,
        "bytes_ratio": _bytes_ratio(entries),
    }
    return Basis(entries, meta)


def _largest_small_side(source) -> int:
    """max over tensors of min(m, n), from shapes alone where the source knows them (0 if it does not)."""
    if not isinstance(source, DeltaSource):
        return 0
    return max((min(_matrix_shape(source.shape(name))) for name in source.names()), default=0)


def _matrix_shape(shape) -> tuple[int, int]:
    """(rows, columns) of a tensor flattened as `as_matrix` flattens it."""
    shape = tuple(int(s) for s in shape)
    return (shape[0], math.prod(shape[1:])) if len(shape) > 1 else (shape[0], 1)


def build_basis_with(source, options: BasisOptions, progress: bool = True) -> Basis:
    """`build_basis` with the settings of a BasisOptions (its include/exclude already applied by `source`)."""
    return build_basis(
        source,
        frac=options.frac,
        eta=options.eta,
        selection=options.selection,
        side=options.side,
        seed=options.seed,
        progress=progress,
    )


def _bytes_ratio(entries: dict[str, BasisEntry]) -> float:
    """Stored factor elements over weight elements (≤ 1 by construction, ≤ 0.5 at frac 0.5 square)."""
    stored = sum(f.Q.numel() for e in entries.values() for f in e.factors().values())
    weights = sum(math.prod(e.shape) for e in entries.values())
    return stored / weights
