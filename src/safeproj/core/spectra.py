"""The one spectrum cache: each tensor's singular vectors (one side) and spectrum, computed once.

A subspace source is a DeltaSource (one SVD per tensor, through `core.spectrum.side_spectrum`) or a
Basis artifact (its stored top vectors and spectrum, no SVD). The "random" control's vectors, those
of a seeded Gaussian matrix of the tensor's shape, are cached beside them. MSO tables, the energy
grid and post hoc projection all read spectra from here, so no analysis has its own SVD path.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from safeproj.core import spectrum as core_spectrum
from safeproj.core.basis import Basis
from safeproj.core.deltas import DeltaSource
from safeproj.core.names import module_sort_key, parse_name
from safeproj.core.options import SIDES, Side, check_choice
from safeproj.io import atomic_file

Subspaces = DeltaSource | Basis
Spectrum = tuple[Tensor, Tensor]  # (Q: d × r singular vectors in descending order of S, S: the full spectrum)


def matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
    """Vectors (biases, norms) are one-column matrices, as everywhere in safeproj."""
    return (int(shape[0]), 1) if len(shape) == 1 else (int(shape[0]), int(shape[1]))


def source_shape(source: Subspaces, name: str) -> tuple[int, ...]:
    if isinstance(source, Basis):
        return tuple(source.entries[name].shape)
    return tuple(source.shape(name))


class SpectrumCache:
    """The singular vectors of one side and the full spectrum of each (source, tensor), computed once.

    In memory, entries live until `release(name)`: analyses fetch a tensor's spectra, evaluate every
    η or frac on them, and release the tensor before moving on. With `cache_dir`, every entry is also
    written as safetensors and read back when asked for again after a release, so a caller that
    releases each tensor holds no more than one tensor's vectors at a time.

    Args:
        side: "left" (output side, the paper's choice) or "right".
        method: passed to `safeproj.core.spectrum.side_spectrum`.
        cache_dir: optional folder for the on-disk form.
        by_content: name stored spectra by the source's description (which carries the content hashes
            of its files), so a later run on the same deltas does no SVD at all; False names them by
            source object instead, for a folder private to this cache (no files are hashed).
    """

    def __init__(
        self,
        side: Side = "left",
        method: str = "auto",
        cache_dir: str | os.PathLike | None = None,
        by_content: bool = True,
    ):
        check_choice("side", side, SIDES)
        self.side, self.method, self.by_content = side, method, by_content
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._memory: dict[tuple[Hashable, str], Spectrum] = {}
        self._folders: dict[int, tuple[Subspaces, str | None]] = {}
        self.computed = 0  # SVDs actually run
        self.loaded = 0  # spectra read back from the on-disk form

    def get(self, source: Subspaces, name: str) -> Spectrum:
        """(Q, S) of one tensor of `source`, on this cache's side."""
        key = (self._register(source), name)
        if key not in self._memory:
            if isinstance(source, Basis):
                self._memory[key] = basis_spectrum(source, name, self.side)
            else:
                folder = self._folders[key[0]][1]
                self._memory[key] = self._fetch(folder, name, lambda: self._delta_spectrum(source, name))
        return self._memory[key]

    def gaussian(self, name: str, shape: tuple[int, int], seed: int) -> Tensor:
        """The "random" control's singular vectors (d × r) for one tensor: one Gaussian SVD shared by every k."""
        m, n = shape
        key = (("gaussian", seed, m, n), name)
        if key not in self._memory:
            folder = f"gaussian-{self.side}-seed{seed}-{m}x{n}"

            def compute() -> Spectrum:
                left = self.side == "left"
                U, S, V = core_spectrum.gaussian_factors(
                    (m, n), seed, name, left=left, right=not left, method=self.method
                )
                return (U if left else V), S

            self._memory[key] = self._fetch(folder, name, compute)
        return self._memory[key][0]

    def release(self, name: str | None = None) -> None:
        """Forget the in-memory spectra of one tensor (every source), or of all tensors."""
        for key in [k for k in self._memory if name is None or k[1] == name]:
            del self._memory[key]

    def _register(self, source: Subspaces) -> int:
        # Holding the source keeps its id from being reused by another object while cached.
        ident = id(source)
        if ident not in self._folders:
            folder = None
            if self.cache_dir is not None and not isinstance(source, Basis):
                if self.by_content:
                    text = json.dumps({"source": source.describe(), "side": self.side}, sort_keys=True, default=str)
                    folder = hashlib.sha256(text.encode()).hexdigest()[:24]
                else:
                    folder = f"source-{len(self._folders)}-{self.side}"
            self._folders[ident] = (source, folder)
        return ident

    def _fetch(self, folder: str | None, name: str, compute: Callable[[], Spectrum]) -> Spectrum:
        path = None
        if folder is not None and self.cache_dir is not None:
            path = self.cache_dir / folder / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.safetensors"
        if path is not None and path.is_file():
            stored = load_file(str(path))
            self.loaded += 1
            return stored["Q"], stored["S"]
        Q, S = compute()
        self.computed += 1
        if path is not None:
            with atomic_file(path) as tmp:
                save_file({"Q": Q.contiguous(), "S": S.contiguous()}, str(tmp))
        return Q, S

    def _delta_spectrum(self, source: DeltaSource, name: str) -> Spectrum:
        delta = core_spectrum.as_matrix(source.get(name))
        low, high = torch.aminmax(delta)
        if low == 0 and high == 0:
            raise ValueError(f"delta of {name} is all zero: it spans no subspace (was this tensor trained?)")
        return core_spectrum.side_spectrum(delta, side=self.side, method=self.method)


def basis_spectrum(basis: Basis, name: str, side: str) -> Spectrum:
    """The stored top vectors (in spectrum order) and the full spectrum of a basis entry.

    A basis keeps the top k directions, or the complement when k > d/2; a complement holds no ordered
    top vectors, so it contributes none (d×0) and every η then needs the delta itself.
    """
    entry = basis.entries[name]
    factor = getattr(entry, side)
    if factor is None:
        raise ValueError(f"basis entry {name} has no {side}-side vectors (the basis was built for another side)")
    selection = basis.meta.get("selection", "top")
    if selection != "top":
        raise ValueError(f"basis of {name} was built with selection={selection!r}; overlap needs top singular vectors")
    if entry.spectrum is None:
        raise ValueError(f"basis entry {name} carries no spectrum; rebuild it with keep_spectrum=True")
    if not bool(entry.spectrum.numel() and entry.spectrum[0] > 0):
        raise ValueError(f"delta of {name} is all zero: it spans no subspace")
    Q = factor.Q.float() if not factor.complement else factor.Q.new_zeros(factor.dim, 0)
    return Q, entry.spectrum.float()


def shared_names(
    source_v: Subspaces, sources_w: Mapping[str, Subspaces], modules: Sequence[str] | None = None, warn: bool = True
) -> list[str]:
    """The tensors of `source_v` that some source of `sources_w` also has (same shape), optionally of some module types.

    Tensors in only one source are skipped with a warning (`warn`); no tensor in common, a shape
    mismatch or an unknown module type is a ValueError.
    """
    names_v = source_v.names()
    in_any = set().union(*(s.names() for s in sources_w.values()))
    shared = [n for n in names_v if n in in_any]
    if not shared:
        raise ValueError(
            "the deltas have no tensor in common (different models?): "
            f"first has e.g. {names_v[:1]}, second has e.g. {sorted(in_any)[:1]}"
        )
    for label, source in sources_w.items():
        names_w = set(source.names())
        only = [n for n in names_v if n not in names_w] + sorted(names_w - set(names_v))
        if only and warn:
            warnings.warn(
                f"{len(only)} tensors are in only one delta{f' ({label})' if label else ''} and are skipped, "
                f"e.g. {only[0]}",
                stacklevel=3,
            )
        for name in shared:
            if name in names_w:
                sv, sw = source_shape(source_v, name), source_shape(source, name)
                if sv != sw:
                    raise ValueError(f"tensor {name} has shape {sv} in one delta and {sw} in the other")
    if modules is not None:
        known = sorted({parse_name(n)[1] for n in shared}, key=module_sort_key)
        unknown = [m for m in modules if m not in known]
        if unknown:
            raise ValueError(f"unknown module type {unknown[0]!r}; known module types: {', '.join(known)}")
        shared = [n for n in shared if parse_name(n)[1] in set(modules)]
    return shared
