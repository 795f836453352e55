"""Mode Subspace Overlap between two weight deltas, and how much of an update a subspace keeps.

MSO(V, W; η) = ‖Q_Vᵀ Q_W‖_F² / min(k_V, k_W), where Q_V holds the top singular vectors of one side
of Δ_V that carry a share η of ‖Δ_V‖_F² (likewise Q_W). Two random subspaces of dimension k_V, k_W in
R^d give max(k_V, k_W) / d on average, the baseline every MSO is compared with.

All spectra come from `safeproj.core.spectrum`; each tensor's SVD is computed once and reused for the
whole η grid (or frac × selection grid), and tensors are processed one at a time, so no two whole
models are ever in memory.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from safeproj import plots
from safeproj.core import overlap as core_overlap
from safeproj.core import projector as core_projector
from safeproj.core import spectrum as core_spectrum
from safeproj.core.basis import Basis, BasisEntry, Factor
from safeproj.core.deltas import DeltaSource, delta_from_spec, select_names
from safeproj.io import atomic_file, write_csv, write_json

ETAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
FRACS = (0.01, 0.25, 0.5, 0.75, 0.99)
SELECTIONS = ("top", "random-k", "random")
SIDES = ("left", "right")
# Canonical order of decoder-block projections in tables and plots; other module types follow, sorted.
MODULE_ORDER = ("q", "k", "v", "o", "qkv", "gate", "up", "gate_up", "down")

# A block index is a whole dotted component after a blocks container: `model.layers.3.` (Llama, Qwen,
# Mistral), `transformer.h.3.` (GPT-2), `encoder.layer.3.`, `blocks.3.`. Matching whole components keeps
# `model.layers_norm.weight` or `model.player.q_proj.weight` from being read as layers.
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")
# `q_proj` -> `q`; GPT-2's `c_proj` appears under both attn and mlp, so it keeps its full name.
_PROJ = re.compile(r"(?!c_proj$)(\w+)_proj")
_PARAM_SUFFIXES = ("weight", "bias", "base_layer")

Subspaces = Union[DeltaSource, Basis]


# ---------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------


def parse_name(name: str) -> tuple[int | None, str]:
    """(block index or None, module type) of a Hugging Face tensor name.

    `model.layers.3.self_attn.q_proj.weight` -> (3, "q"); `lm_head.weight` -> (None, "lm_head").
    """
    match = _LAYER.search(name)
    layer = int(match.group(1)) if match else None
    parts = [p for p in name.split(".") if p and p not in _PARAM_SUFFIXES]
    leaf = parts[-1] if parts else name
    proj = _PROJ.fullmatch(leaf)
    return layer, proj.group(1) if proj else leaf


def module_sort_key(module: str) -> tuple[int, str]:
    return (MODULE_ORDER.index(module), "") if module in MODULE_ORDER else (len(MODULE_ORDER), module)


# ---------------------------------------------------------------------------------------------
# Spectra, computed once per (source, tensor)
# ---------------------------------------------------------------------------------------------


def _source_names(source: Subspaces) -> list[str]:
    return list(source.names())


def _source_shape(source: Subspaces, name: str) -> tuple[int, ...]:
    if isinstance(source, Basis):
        return tuple(source.entries[name].shape)
    return tuple(source.shape(name))


def _matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
    # Vectors (biases, norms) are treated as one-column matrices, as everywhere in safeproj.
    return (int(shape[0]), 1) if len(shape) == 1 else (int(shape[0]), int(shape[1]))


def _as_matrix(delta: torch.Tensor) -> torch.Tensor:
    return delta.reshape(-1, 1) if delta.ndim == 1 else delta


def _describe(source: Subspaces) -> Any:
    if isinstance(source, Basis):
        return {"basis": source.meta}
    return source.describe()


class SpectrumCache:
    """The singular vectors of one side and the full spectrum of each (source, tensor), computed once.

    In memory, entries live until `release(name)`: analyses fetch both sources' spectra of a tensor,
    evaluate every η (or frac) on them, and release the tensor before moving on. With `cache_dir`,
    spectra are also stored as safetensors under a key made from the source's description (which
    carries the content hashes of its files), so a later run on the same deltas does no SVD at all.
    Basis artifacts need no SVD: their stored top vectors and spectrum are used as they are.

    Args:
        side: "left" (output side, the paper's choice) or "right".
        method: passed to `safeproj.core.spectrum.side_spectrum`.
        cache_dir: optional folder for the on-disk cache.
    """

    def __init__(self, side: str = "left", method: str = "auto", cache_dir: str | os.PathLike | None = None):
        if side not in SIDES:
            raise ValueError(f"side={side!r}: expected one of {SIDES}")
        self.side, self.method = side, method
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._memory: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self._keys: dict[int, tuple[Subspaces, str | None]] = {}
        self.computed = 0  # SVDs actually run
        self.loaded = 0  # spectra read back from the on-disk cache

    def get(self, source: Subspaces, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q, S): Q (d × r) the singular vectors of `side` in descending order of S (length r ≥ columns of Q)."""
        key = (self._register(source), name)
        if key not in self._memory:
            self._memory[key] = self._load_or_compute(source, name)
        return self._memory[key]

    def release(self, name: str | None = None) -> None:
        """Forget the in-memory spectra of one tensor (every source), or of all tensors."""
        for key in [k for k in self._memory if name is None or k[1] == name]:
            del self._memory[key]

    def _register(self, source: Subspaces) -> int:
        # Holding the source keeps its id from being reused by another object while cached.
        ident = id(source)
        if ident not in self._keys:
            digest = None
            if self.cache_dir is not None and not isinstance(source, Basis):
                text = json.dumps({"source": _describe(source), "side": self.side}, sort_keys=True, default=str)
                digest = hashlib.sha256(text.encode()).hexdigest()[:24]
            self._keys[ident] = (source, digest)
        return ident

    def _path(self, source: Subspaces, name: str) -> Path | None:
        digest = self._keys[id(source)][1]
        if digest is None or self.cache_dir is None:
            return None
        return self.cache_dir / digest / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.safetensors"

    def _load_or_compute(self, source: Subspaces, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(source, Basis):
            return _basis_spectrum(source, name, self.side)
        path = self._path(source, name)
        if path is not None and path.is_file():
            stored = load_file(str(path))
            self.loaded += 1
            return stored["Q"], stored["S"]
        delta = _as_matrix(source.get(name).float())
        if not bool(delta.abs().amax() > 0):
            raise ValueError(f"delta of {name} is all zero: it spans no subspace (was this tensor trained?)")
        Q, S = core_spectrum.side_spectrum(delta, side=self.side, method=self.method)
        self.computed += 1
        if path is not None:
            with atomic_file(path) as tmp:
                save_file({"Q": Q.contiguous(), "S": S.contiguous()}, str(tmp))
        return Q, S


def _basis_spectrum(basis: Basis, name: str, side: str) -> tuple[torch.Tensor, torch.Tensor]:
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


def _columns(Q: torch.Tensor, k: int, name: str, what: str) -> torch.Tensor:
    if k > Q.shape[1]:
        raise ValueError(
            f"{name}: {what} needs {k} directions but only {Q.shape[1]} are stored; "
            "use the delta itself or a basis built with a larger frac"
        )
    return Q[:, :k]


# ---------------------------------------------------------------------------------------------
# Mode Subspace Overlap
# ---------------------------------------------------------------------------------------------


def check_etas(etas: Iterable[float]) -> list[float]:
    """Sorted, de-duplicated η values; ValueError unless each lies in (0, 1]."""
    etas = [float(e) for e in etas]
    if not etas:
        raise ValueError("etas is empty: give at least one energy share in (0, 1]")
    for eta in etas:
        if not 0.0 < eta <= 1.0:
            raise ValueError(f"eta={eta}: energy shares must be in (0, 1]")
    return sorted(set(etas))


def _shared_names(
    source_v: Subspaces, sources_w: Mapping[str, Subspaces], modules: Sequence[str] | None, warn: bool = True
) -> list[str]:
    names_v = _source_names(source_v)
    in_any = set().union(*(_source_names(s) for s in sources_w.values()))
    shared = [n for n in names_v if n in in_any]
    if not shared:
        raise ValueError(
            "the deltas have no tensor in common (different models?): "
            f"first has e.g. {names_v[:1]}, second has e.g. {sorted(in_any)[:1]}"
        )
    for label, source in sources_w.items():
        names_w = set(_source_names(source))
        only = [n for n in names_v if n not in names_w] + sorted(names_w - set(names_v))
        if only and warn:
            warnings.warn(
                f"{len(only)} tensors are in only one delta{f' ({label})' if label else ''} and are skipped, "
                f"e.g. {only[0]}",
                stacklevel=3,
            )
        for name in shared:
            if name in names_w:
                sv, sw = _source_shape(source_v, name), _source_shape(source, name)
                if sv != sw:
                    raise ValueError(f"tensor {name} has shape {sv} in one delta and {sw} in the other")
    if modules is not None:
        known = sorted({parse_name(n)[1] for n in shared}, key=module_sort_key)
        unknown = [m for m in modules if m not in known]
        if unknown:
            raise ValueError(f"unknown module type {unknown[0]!r}; known module types: {', '.join(known)}")
        shared = [n for n in shared if parse_name(n)[1] in set(modules)]
    return shared


def _mso_rows(name: str, spec_v, spec_w, etas: Sequence[float]) -> tuple[list[dict], int]:
    """Rows for every η, and how many η were left out because a basis stores too few top vectors."""
    (Qv, Sv), (Qw, Sw) = spec_v, spec_w
    d = Qv.shape[0]
    if Qw.shape[0] != d:
        raise ValueError(f"tensor {name}: subspaces live in R^{d} and R^{Qw.shape[0]}")
    layer, module = parse_name(name)
    rows, skipped = [], 0
    for eta in etas:
        kv = core_spectrum.k_for_energy(Sv, eta)
        kw = core_spectrum.k_for_energy(Sw, eta)
        if kv > Qv.shape[1] or kw > Qw.shape[1]:
            skipped += 1
            continue
        V, W = Qv[:, :kv], Qw[:, :kw]
        mso = float(core_overlap.mso(V, W))
        baseline = float(core_overlap.random_baseline(kv, kw, d))
        angles = core_overlap.principal_angles(V, W)
        rows.append(
            {
                "name": name,
                "layer": layer,
                "module": module,
                "eta": eta,
                "k_v": kv,
                "k_w": kw,
                "d": d,
                "mso": mso,
                "baseline": baseline,
                "ratio": mso / baseline,
                "angle_deg": math.degrees(float(angles.mean())),
            }
        )
    return rows, skipped


def mso_tables(
    source_v: Subspaces,
    sources_w: Mapping[str, Subspaces],
    etas: Sequence[float] = ETAS,
    side: str = "left",
    modules: Sequence[str] | None = None,
    cache: SpectrumCache | None = None,
    progress: bool = False,
    warn_unshared: bool = True,
) -> dict[str, list[dict]]:
    """`mso_table` of one delta against several, computing the first delta's spectra once per tensor.

    `warn_unshared=False` silences the warning about tensors present in only one delta (expected when
    a LoRA run covers a few modules of a full reference).
    """
    etas = check_etas(etas)
    if not sources_w:
        raise ValueError("no reference delta to compare with")
    cache = cache or SpectrumCache(side=side)
    if cache.side != side:
        raise ValueError(f"cache holds {cache.side}-side spectra but side={side!r}")
    names = _shared_names(source_v, sources_w, modules, warn=warn_unshared)
    members = {label: set(_source_names(s)) for label, s in sources_w.items()}
    tables: dict[str, list[dict]] = {label: [] for label in sources_w}
    skipped = dict.fromkeys(sources_w, 0)
    for name in tqdm(names, desc="MSO", unit="tensor", disable=not progress):
        try:
            spec_v = cache.get(source_v, name)
            for label, source_w in sources_w.items():
                if name in members[label]:
                    rows, left_out = _mso_rows(name, spec_v, cache.get(source_w, name), etas)
                    tables[label].extend(rows)
                    skipped[label] += left_out
        finally:
            cache.release(name)
    for label, count in skipped.items():
        where = f" ({label})" if label else ""
        if count and not tables[label]:
            raise ValueError(
                f"no η could be evaluated{where}: the basis artifact stores too few top singular vectors; "
                "compare the delta itself, or a basis built with selection='top' and frac <= 0.5"
            )
        if count:
            warnings.warn(
                f"{count} tensor × η pairs{where} need more top vectors than the basis artifact stores "
                "and were left out",
                stacklevel=2,
            )
    return tables


def mso_table(
    source_v: Subspaces,
    source_w: Subspaces,
    etas: Sequence[float] = ETAS,
    side: str = "left",
    modules: Sequence[str] | None = None,
    cache: SpectrumCache | None = None,
    progress: bool = False,
) -> list[dict]:
    """MSO of two deltas (or basis artifacts with spectra), one row per shared tensor × η.

    Rows: name, layer (None outside decoder blocks), module (q, k, v, o, gate, up, down, …), eta,
    k_v, k_w, d, mso, baseline (max(k_v, k_w)/d), ratio (mso/baseline), angle_deg (mean principal angle).

    Raises:
        ValueError: η outside (0, 1]; no shared tensor or a shared tensor with different shapes;
            an unknown module type in `modules`; an all-zero delta (named).
    """
    return mso_tables(source_v, {"": source_w}, etas, side, modules, cache, progress)[""]


AGGREGATE_BY = ("layer", "module", "model")


def aggregate(rows: Sequence[dict], by: str = "model") -> list[dict]:
    """Mean MSO, baseline and angle per (layer | module | whole model) and η; ratio is a ratio of means.

    Rows outside decoder blocks (layer None) are left out of the per-layer view.
    """
    if by not in AGGREGATE_BY:
        raise ValueError(f"by={by!r}: expected one of {AGGREGATE_BY}")
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        if by == "layer" and row["layer"] is None:
            continue
        groups[(row[by] if by != "model" else "model", row["eta"])].append(row)

    def order(key):
        group, eta = key
        return (module_sort_key(group) if by == "module" else group, eta)

    out = []
    for key in sorted(groups, key=order):
        members = groups[key]
        n = len(members)
        mso = sum(r["mso"] for r in members) / n
        baseline = sum(r["baseline"] for r in members) / n
        entry = {by: key[0]} if by != "model" else {}
        entry.update(
            {
                "eta": key[1],
                "tensors": n,
                "mso": mso,
                "baseline": baseline,
                "ratio": mso / baseline,
                "angle_deg": sum(r["angle_deg"] for r in members) / n,
            }
        )
        out.append(entry)
    return out


# ---------------------------------------------------------------------------------------------
# Energy retained: the share of an update that a subspace keeps
# ---------------------------------------------------------------------------------------------


def _check_fracs(fracs: Iterable[float]) -> list[float]:
    fracs = [float(f) for f in fracs]
    if not fracs:
        raise ValueError("fracs is empty: give at least one rank fraction in (0, 1]")
    for frac in fracs:
        if not 0.0 < frac <= 1.0:
            raise ValueError(f"frac={frac}: rank fractions must be in (0, 1]")
    return sorted(set(fracs))


def energy_retained(
    basis_source: Subspaces,
    update_source: DeltaSource,
    fracs: Sequence[float] = FRACS,
    selections: Sequence[str] = SELECTIONS,
    seed: int = 0,
    side: str = "left",
    cache: SpectrumCache | None = None,
    progress: bool = False,
) -> list[dict]:
    """Share of ‖Δ_T‖_F² kept by P_k (k from frac of the basis delta's spectrum), per selection.

    Rows per tensor (scope "tensor") and pooled over tensors (scope "pooled", Σ‖PΔ‖² / Σ‖Δ‖²):
    name, layer, module, frac, selection, k, d, kept, total, share, random_share (the expected share
    of a uniformly random k-dimensional subspace). The basis spectra are computed once per tensor.
    """
    fracs = _check_fracs(fracs)
    bad = [s for s in selections if s not in SELECTIONS]
    if bad or not selections:
        raise ValueError(f"selection {bad[0] if bad else None!r}: expected some of {SELECTIONS}")
    cache = cache or SpectrumCache(side=side)
    if cache.side != side:
        raise ValueError(f"cache holds {cache.side}-side spectra but side={side!r}")
    names = _shared_names(update_source, {"": basis_source}, None)
    rows: list[dict] = []
    for name in tqdm(names, desc="energy retained", unit="tensor", disable=not progress):
        try:
            Q, S = cache.get(basis_source, name)
            update = _as_matrix(update_source.get(name).float())
            rows.extend(_energy_rows(name, Q, S, update, fracs, selections, seed, side))
        finally:
            cache.release(name)
    return rows + pool_energy(rows)


def _energy_rows(name, Q, S, update, fracs, selections, seed, side) -> list[dict]:
    m, n = update.shape
    d = m if side == "left" else n
    total = float(update.pow(2).sum())
    layer, module = parse_name(name)
    gaussian = None
    if "random" in selections:
        # The Gaussian control's factorization, once per tensor; its top-k columns are exactly
        # what select_vectors(..., "random") returns for each k.
        U, _, V = core_spectrum.gaussian_factors((m, n), seed, name, left=side == "left", right=side == "right")
        gaussian = U if side == "left" else V
    rows = []
    for frac in fracs:
        k = core_spectrum.k_for_frac(frac, m, n)
        for selection in selections:
            if selection == "top":
                Qk = _columns(Q, k, name, f"frac={frac:g}")
            elif selection == "random":
                Qk = gaussian[:, :k]
            else:
                if Q.shape[1] < len(S):
                    raise ValueError(f"{name}: random-k needs every singular vector; the basis stores {Q.shape[1]}")
                Qk = core_spectrum.select_vectors(Q, k, selection, seed=seed, shape=(m, n), side=side, name=name)
            entry = BasisEntry(
                name=name,
                shape=(m, n),
                left=Factor(Qk, complement=False) if side == "left" else None,
                right=Factor(Qk, complement=False) if side == "right" else None,
                energy_kept=float("nan"),
                energy_total=float("nan"),
                spectrum=None,
            )
            share = float(core_projector.energy_share(update, entry)) if total > 0 else float("nan")
            rows.append(
                {
                    "scope": "tensor",
                    "name": name,
                    "layer": layer,
                    "module": module,
                    "frac": frac,
                    "selection": selection,
                    "k": int(Qk.shape[1]),
                    "d": d,
                    "kept": share * total if total > 0 else 0.0,
                    "total": total,
                    "share": share,
                    "random_share": float(core_projector.random_share(entry)),
                }
            )
    return rows


def pool_energy(rows: Sequence[dict]) -> list[dict]:
    """Pooled rows per (frac, selection): Σ kept / Σ total, i.e. the energy-weighted mean of the shares."""
    sums: dict[tuple, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0])
    for row in rows:
        if row["scope"] != "tensor":
            continue
        acc = sums[(row["frac"], row["selection"])]
        acc[0] += row["kept"]
        acc[1] += row["total"]
        acc[2] += row["random_share"] * row["total"]
        acc[3] += 1
    order = {s: i for i, s in enumerate(SELECTIONS)}
    pooled = []
    for (frac, selection), (kept, total, random_kept, count) in sorted(
        sums.items(), key=lambda kv: (order[kv[0][1]], kv[0][0])
    ):
        pooled.append(
            {
                "scope": "pooled",
                "name": f"pooled ({count} tensors)",
                "layer": None,
                "module": None,
                "frac": frac,
                "selection": selection,
                "k": None,
                "d": None,
                "kept": kept,
                "total": total,
                "share": kept / total if total > 0 else float("nan"),
                "random_share": random_kept / total if total > 0 else float("nan"),
            }
        )
    return pooled


# ---------------------------------------------------------------------------------------------
# Plots and files
# ---------------------------------------------------------------------------------------------


def plot_mso_vs_eta(rows: Sequence[dict], path: str | os.PathLike, title: str = "Mode Subspace Overlap") -> Path:
    """MSO against η: one line per module type, the model mean in bold, the random baseline dashed."""
    series = {}
    for module, group in _grouped(aggregate(rows, "module"), "module").items():
        series[module] = ([r["eta"] for r in group], [r["mso"] for r in group])
    model = aggregate(rows, "model")
    etas = [r["eta"] for r in model]
    series["model mean"] = (etas, [r["mso"] for r in model])
    return plots.line_plot(
        series,
        path,
        baseline=(etas, [r["baseline"] for r in model]),
        baseline_label="random baseline (model mean)",
        emphasize="model mean",
        title=title,
        xlabel="energy share η",
        ylabel="MSO",
        ylim=(0.0, 1.02),
    )


def plot_ratio_heatmap(
    rows: Sequence[dict], path: str | os.PathLike, title: str = "MSO / random baseline"
) -> Path | None:
    """Layer × η heatmap of the per-layer ratio of mean MSO to mean baseline (None without layered tensors)."""
    by_layer = aggregate(rows, "layer")
    if not by_layer:
        return None
    layers = sorted({r["layer"] for r in by_layer})
    etas = sorted({r["eta"] for r in by_layer})
    cell = {(r["layer"], r["eta"]): r["ratio"] for r in by_layer}
    values = [[cell.get((layer, eta), float("nan")) for eta in etas] for layer in layers]
    return plots.heatmap(
        values,
        path,
        row_labels=[str(layer) for layer in layers],
        col_labels=[f"{eta:g}" for eta in etas],
        title=title,
        xlabel="energy share η",
        ylabel="layer",
        colorbar_label="MSO / baseline",
        center=1.0,
    )


def plot_energy(rows: Sequence[dict], path: str | os.PathLike, title: str = "Update energy kept by P_k") -> Path:
    """Pooled energy share against frac, one line per selection, the random-subspace expectation dashed."""
    pooled = [r for r in rows if r["scope"] == "pooled"]
    if not pooled:
        raise ValueError("no pooled energy rows to plot")
    series = {
        selection: ([r["frac"] for r in group], [r["share"] for r in group])
        for selection, group in _grouped(pooled, "selection").items()
    }
    first = next(iter(_grouped(pooled, "selection").values()))
    return plots.line_plot(
        series,
        path,
        baseline=([r["frac"] for r in first], [r["random_share"] for r in first]),
        baseline_label="random subspace (expected)",
        title=title,
        xlabel="rank fraction k / min(m, n)",
        ylabel="share of ‖Δ‖² kept",
        ylim=(0.0, 1.02),
    )


def _grouped(rows: Sequence[dict], key: str) -> dict[Any, list[dict]]:
    groups: dict[Any, list[dict]] = {}
    for row in rows:
        groups.setdefault(row[key], []).append(row)
    return groups


def write_rows(rows: Sequence[dict], path: str | os.PathLike) -> Path:
    """Rows as CSV or JSON (by suffix), written to a temp file and renamed into place."""
    path = Path(path)
    if path.suffix not in (".csv", ".json"):
        raise ValueError(f"rows are written as .csv or .json, got {str(path)!r}")
    if path.suffix == ".csv":
        return write_csv(path, rows)
    return write_json(path, list(rows), indent=1, default=str)


def summary_lines(rows: Sequence[dict], etas: Sequence[float] | None = None) -> list[str]:
    """A fixed-width table: per module type and over the model, MSO / baseline / ratio at a few η."""
    all_etas = sorted({r["eta"] for r in rows})
    if etas is None:
        picks = {all_etas[0], all_etas[len(all_etas) // 2], all_etas[-1]}
        etas = sorted(picks)
    groups = [(r["module"], r) for r in aggregate(rows, "module")] + [("model", r) for r in aggregate(rows, "model")]
    lines = [f"{'module':<10} {'eta':>5} {'tensors':>7} {'mso':>8} {'baseline':>9} {'ratio':>8} {'angle°':>7}"]
    for label, r in groups:
        if r["eta"] in etas:
            lines.append(
                f"{label:<10} {r['eta']:>5g} {r['tensors']:>7d} {r['mso']:>8.4f} {r['baseline']:>9.4f} "
                f"{r['ratio']:>8.2f} {r['angle_deg']:>7.1f}"
            )
    return lines


# ---------------------------------------------------------------------------------------------
# `safeproj overlap`
# ---------------------------------------------------------------------------------------------


def load_subspaces(spec: str, include: list[str] | None = None, exclude: list[str] | None = None) -> Subspaces:
    """A basis artifact (`*.safetensors` with spectra) or any delta spec (see `safeproj.model.subspaces`)."""
    if spec.endswith(".safetensors"):
        if not Path(spec).is_file():
            raise FileNotFoundError(f"basis file {spec} does not exist")
        basis = Basis.load(spec)
        keep = set(select_names(list(basis.entries), include, exclude))
        basis.entries = {name: entry for name, entry in basis.entries.items() if name in keep}
        if not basis.entries:
            raise ValueError(f"basis {spec} has no tensor matching include={include} exclude={exclude}")
        return basis
    if spec.startswith("safety:"):
        # Imported only here: it builds the safety-tuned preset, which needs the model stack.
        from safeproj.model.subspaces import delta_source

        return delta_source(spec, include, exclude)
    return delta_from_spec(spec, include, exclude)


def overlap_command(
    a: str,
    b: str,
    etas: list[float] = list(ETAS),
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    modules: list[str] | None = None,
    out_dir: str = "runs/overlap",
    energy: bool = False,
    side: str = "left",
    fracs: list[float] = list(FRACS),
    seed: int = 0,
    cache_dir: str | None = None,
) -> dict[str, str]:
    """Mode Subspace Overlap of two weight deltas, per tensor, layer and module type, for a grid of η.

    Writes mso.csv/json (one row per tensor × η), mso_by_module.csv, mso_by_layer.csv, mso_model.csv,
    mso_vs_eta.png and mso_ratio_heatmap.png to `out_dir`, and prints a summary table.

    Args:
        a: first delta: `TUNED,BASE` checkpoint dirs, a LoRA adapter dir, a finished run's checkpoint
            dir, `safety:<preset>`, or a basis artifact (`.safetensors`) that keeps its spectrum.
        b: second delta, same forms as `a`.
        etas: energy shares η in (0, 1]: each side keeps its fewest top singular vectors holding η of ‖Δ‖_F².
        include: regexes of tensor names (default: attention and MLP projections of decoder blocks).
        exclude: regexes of tensor names to leave out.
        modules: only these module types (q, k, v, o, gate, up, down, …).
        out_dir: where tables and plots go.
        energy: also write the share of ‖Δ_b‖² kept by the top/random-k/random subspaces of `a`
            for each frac (energy.csv/json, energy_retained.png).
        side: "left" (output side, the paper's choice) or "right".
        fracs: rank fractions of the energy diagnostic.
        seed: seed of the random selections of the energy diagnostic.
        cache_dir: keep spectra here as safetensors so a repeated comparison needs no SVD.

    Returns:
        The written files by kind.
    """
    etas = check_etas(etas)
    if side not in SIDES:
        raise ValueError(f"side={side!r}: expected one of {SIDES}")
    source_a = load_subspaces(a, include, exclude)
    source_b = load_subspaces(b, include, exclude)
    cache = SpectrumCache(side=side, cache_dir=cache_dir)
    rows = mso_table(source_a, source_b, etas, side=side, modules=modules, cache=cache, progress=True)
    out = Path(out_dir)
    written = {
        "rows_csv": write_rows(rows, out / "mso.csv"),
        "rows_json": write_rows(rows, out / "mso.json"),
        "by_module": write_rows(aggregate(rows, "module"), out / "mso_by_module.csv"),
        "by_layer": write_rows(aggregate(rows, "layer"), out / "mso_by_layer.csv"),
        "model": write_rows(aggregate(rows, "model"), out / "mso_model.csv"),
        "mso_plot": plot_mso_vs_eta(rows, out / "mso_vs_eta.png", title=f"MSO: {Path(a).name} vs {Path(b).name}"),
    }
    heat = plot_ratio_heatmap(rows, out / "mso_ratio_heatmap.png")
    if heat is not None:
        written["ratio_heatmap"] = heat
    tensors = len({r["name"] for r in rows})
    print(f"MSO of {a} and {b}: {tensors} tensors, {side} side ({cache.computed} SVDs)")
    print("\n".join(summary_lines(rows)))
    if energy:
        if isinstance(source_b, Basis):
            raise ValueError("energy=True needs `b` as a delta (the update), not a basis artifact")
        energy_rows = energy_retained(
            source_a, source_b, fracs, SELECTIONS, seed, side=side, cache=cache, progress=True
        )
        written["energy_csv"] = write_rows(energy_rows, out / "energy.csv")
        written["energy_json"] = write_rows(energy_rows, out / "energy.json")
        written["energy_plot"] = plot_energy(energy_rows, out / "energy_retained.png")
        print(f"share of ‖Δ_b‖² kept by subspaces of a ({side} side):")
        for row in (r for r in energy_rows if r["scope"] == "pooled"):
            print(
                f"  {row['selection']:<9} frac={row['frac']:<5g} share={row['share']:.4f} "
                f"(random subspace {row['random_share']:.4f})"
            )
    print(f"wrote {out}")
    return {kind: str(path) for kind, path in written.items()}
