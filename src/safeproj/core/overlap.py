"""How much two subspaces share: Mode Subspace Overlap (MSO), principal angles, and MSO tables of two deltas.

Subspaces are d×k matrices with orthonormal columns, or basis Factors (which may hold the
complement of the kept subspace; the overlap is then computed without forming the kept basis).

MSO(V, W; η) = ‖Q_Vᵀ Q_W‖_F² / min(k_V, k_W), where Q_V holds the top singular vectors of one side
of Δ_V that carry a share η of ‖Δ_V‖_F² (likewise Q_W). Two random subspaces of dimension k_V, k_W in
R^d give max(k_V, k_W) / d on average, the baseline every MSO is compared with. The tables take each
tensor's spectrum once from a SpectrumCache for the whole η grid, one tensor at a time.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from safeproj.core.factors import Factor
from safeproj.core.names import module_sort_key, parse_name
from safeproj.core.options import ETAS, Side, check_fractions
from safeproj.core.sharded import RowShard
from safeproj.core.sharded_spectrum import RowFactorization, cross_of_rows, principal_angles_of_rows
from safeproj.core.spectra import Spectrum, SpectrumCache, Subspaces, shared_names
from safeproj.core.spectrum import k_for_energy, orthogonal_complement


def _parts(Q: Tensor | Factor, what: str) -> tuple[Tensor, bool, int, int]:
    """(stored matrix in float64, is complement, d, kept dimension k)."""
    if isinstance(Q, Factor):
        M, complement, k = Q.Q, Q.complement, Q.k
    else:
        M, complement, k = Q, False, (Q.shape[1] if Q.ndim == 2 else 0)
    if M.ndim != 2:
        raise ValueError(f"{what} must be a d×k matrix, got shape {tuple(M.shape)}")
    if k < 1:
        raise ValueError(f"{what} spans no directions (k=0)")
    return M.detach().double(), complement, M.shape[0], k


def mso(Qv: Tensor | Factor, Qw: Tensor | Factor) -> float:
    """MSO(V, W) = ‖Q_Vᵀ Q_W‖_F² / min(k_V, k_W): 1 if one subspace contains the other, 0 if orthogonal."""
    V, v_comp, d, kv = _parts(Qv, "Qv")
    W, w_comp, dw, kw = _parts(Qw, "Qw")
    if d != dw:
        raise ValueError(f"subspaces live in different spaces: R^{d} and R^{dw}")
    cross = (V.T @ W).square().sum().item()
    # ‖P_V P_W‖_F² = tr(P_V P_W), expanded with P = I − U⊥U⊥ᵀ on complement sides.
    if v_comp and w_comp:
        shared = kv + kw - d + cross
    elif v_comp:
        shared = kw - cross
    elif w_comp:
        shared = kv - cross
    else:
        shared = cross
    return shared / min(kv, kw)


def random_baseline(kv: int, kw: int, d: int) -> float:
    """Expected MSO of two uniformly random subspaces of dimensions kv, kw in R^d: max(kv, kw)/d."""
    if not (1 <= kv <= d and 1 <= kw <= d):
        raise ValueError(f"need 1 <= kv, kw <= d, got kv={kv}, kw={kw}, d={d}")
    return max(kv, kw) / d


def _kept(Q: Tensor | Factor, what: str) -> Tensor:
    M, complement, _, _ = _parts(Q, what)
    return orthogonal_complement(M) if complement else M


def principal_angles(Qv: Tensor | Factor, Qw: Tensor | Factor) -> Tensor:
    """The min(k_V, k_W) principal angles in radians, ascending, in [0, π/2] (float32).

    Small angles come from sines and large ones from cosines, so both ends stay accurate.
    """
    A, B = _kept(Qv, "Qv"), _kept(Qw, "Qw")
    if A.shape[0] != B.shape[0]:
        raise ValueError(f"subspaces live in different spaces: R^{A.shape[0]} and R^{B.shape[0]}")
    if A.shape[1] > B.shape[1]:
        A, B = B, A  # A: the smaller subspace
    C = B.T @ A
    cos = torch.linalg.svdvals(C).clamp(0, 1)  # descending
    sin = torch.linalg.svdvals(A - B @ C).clamp(0, 1).flip(0)  # ascending, paired with cos
    angles = torch.where(cos > math.sqrt(0.5), torch.arcsin(sin), torch.arccos(cos))
    return angles.sort().values.float()


def _grid(Sv: Tensor, Sw: Tensor, cols_v: int, cols_w: int, etas: Sequence[float]):
    """(η, k_v, k_w) for every η both sides have enough vectors for, and how many η were left out."""
    grid, skipped = [], 0
    for eta in etas:
        kv, kw = k_for_energy(Sv, eta), k_for_energy(Sw, eta)
        if kv > cols_v or kw > cols_w:
            skipped += 1
        else:
            grid.append((eta, kv, kw))
    return grid, skipped


def _row(name: str, eta: float, kv: int, kw: int, d: int, overlap: float, angles: Tensor) -> dict:
    layer, module = parse_name(name)
    baseline = random_baseline(kv, kw, d)
    return {
        "name": name,
        "layer": layer,
        "module": module,
        "eta": eta,
        "k_v": kv,
        "k_w": kw,
        "d": d,
        "mso": overlap,
        "baseline": baseline,
        "ratio": overlap / baseline,
        "angle_deg": math.degrees(float(angles.mean())),
    }


def _mso_rows(name: str, spec_v, spec_w, etas: Sequence[float]) -> tuple[list[dict], int]:
    """Rows for every η, and how many η were left out because a basis stores too few top vectors."""
    (Qv, Sv), (Qw, Sw) = spec_v, spec_w
    d = Qv.shape[0]
    if Qw.shape[0] != d:
        raise ValueError(f"tensor {name}: subspaces live in R^{d} and R^{Qw.shape[0]}")
    grid, skipped = _grid(Sv, Sw, Qv.shape[1], Qw.shape[1], etas)
    rows = []
    for eta, kv, kw in grid:
        V, W = Qv[:, :kv], Qw[:, :kw]
        rows.append(_row(name, eta, kv, kw, d, mso(V, W), principal_angles(V, W)))
    return rows, skipped


def _mso_rows_of_shard(
    name: str, factors: RowFactorization, shard: RowShard, spec_w, etas: Sequence[float]
) -> tuple[list[dict], int]:
    """`_mso_rows` on the left side of a row-sharded Δ: one k_V×k_W all-reduce for the η grid, and one
    small one per η for its principal angles. Every process sharing the rows calls it together."""
    Qw, Sw = spec_w
    d = factors.shape[0]
    if Qw.shape[0] != d:
        raise ValueError(f"tensor {name}: subspaces live in R^{d} and R^{Qw.shape[0]}")
    grid, skipped = _grid(factors.S, Sw, min(factors.shape), Qw.shape[1], etas)
    if not grid:
        return [], skipped
    qv = factors.left_rows(max(kv for _, kv, _ in grid))
    qw = Qw[shard.start : shard.start + qv.shape[0], : max(kw for _, _, kw in grid)].to(qv)
    cross = cross_of_rows(qv, qw, shard.sum_over_rows)  # Q_Vᵀ Q_W of the largest k_v, k_w
    rows = []
    for eta, kv, kw in grid:
        c = cross[:kv, :kw]
        if kv <= kw:  # the smaller subspace first, as `principal_angles` takes it
            angles = principal_angles_of_rows(qv[:, :kv], qw[:, :kw], c.T, shard.sum_over_rows)
        else:
            angles = principal_angles_of_rows(qw[:, :kw], qv[:, :kv], c, shard.sum_over_rows)
        rows.append(_row(name, eta, kv, kw, d, c.square().sum().item() / min(kv, kw), angles))
    return rows, skipped


Compare = Callable[[Spectrum], tuple[list[dict], int]]
"""The MSO rows of one tensor of the first delta against one reference spectrum, and the η left out."""


def mso_tables(
    source_v: Subspaces,
    sources_w: Mapping[str, Subspaces],
    etas: Sequence[float] = ETAS,
    side: Side = "left",
    modules: Sequence[str] | None = None,
    cache: SpectrumCache | None = None,
    progress: bool = False,
    warn_unshared: bool = True,
) -> dict[str, list[dict]]:
    """`mso_table` of one delta against several, computing the first delta's spectra once per tensor.

    `warn_unshared=False` silences the warning about tensors present in only one delta (expected when
    a LoRA run covers a few modules of a full reference).
    """
    etas = check_fractions("eta", etas)
    cache = _side_cache(cache, side)

    def compare(name: str) -> Compare:
        spec_v = cache.get(source_v, name)
        return lambda spec_w: _mso_rows(name, spec_v, spec_w, etas)

    return _tables(source_v, sources_w, compare, cache, modules, progress, warn_unshared)


def sharded_mso_tables(
    source_v: Subspaces,
    update_rows: Callable[[str], tuple[Tensor, RowShard]],
    sources_w: Mapping[str, Subspaces],
    etas: Sequence[float] = ETAS,
    side: Side = "left",
    cache: SpectrumCache | None = None,
    progress: bool = False,
    warn_unshared: bool = True,
) -> dict[str, list[dict]]:
    """`mso_tables` of a delta whose tensors are sharded by rows across processes (FSDP2), none gathered.

    `source_v` names the tensors and their shapes; `update_rows(name)` gives this process's rows of
    one and its `RowShard`. Each tensor's spectrum comes from its n×n Gram matrix, one float64
    all-reduce of 8·n² bytes (`RowFactorization`); the right side's vectors are then whole on every
    process, the left side's are local rows, and Q_Vᵀ Q_W adds one k_V×k_W all-reduce and the
    principal angles one k×k all-reduce per η. References are read whole on every process. Every
    process sharing the rows calls this together and gets the same tables.
    """
    etas = check_fractions("eta", etas)
    cache = _side_cache(cache, side)

    def compare(name: str) -> Compare:
        local, shard = update_rows(name)
        factors = RowFactorization(local, shard.rows, shard.sum_over_rows)
        if factors.S[0] == 0:
            raise ValueError(f"delta of {name} is all zero: it spans no subspace (was this tensor trained?)")
        if side == "right":
            spec_v = (factors.right_vectors(), factors.S)
            return lambda spec_w: _mso_rows(name, spec_v, spec_w, etas)
        return lambda spec_w: _mso_rows_of_shard(name, factors, shard, spec_w, etas)

    return _tables(source_v, sources_w, compare, cache, None, progress, warn_unshared)


def _side_cache(cache: SpectrumCache | None, side: Side) -> SpectrumCache:
    cache = cache or SpectrumCache(side=side)
    if cache.side != side:
        raise ValueError(f"cache holds {cache.side}-side spectra but side={side!r}")
    return cache


def _tables(
    source_v: Subspaces,
    sources_w: Mapping[str, Subspaces],
    compare: Callable[[str], Compare],
    cache: SpectrumCache,
    modules: Sequence[str] | None,
    progress: bool,
    warn_unshared: bool,
) -> dict[str, list[dict]]:
    """Every reference's rows over the shared tensors, one tensor's spectra at a time."""
    if not sources_w:
        raise ValueError("no reference delta to compare with")
    names = shared_names(source_v, sources_w, modules, warn=warn_unshared)
    members = {label: set(s.names()) for label, s in sources_w.items()}
    tables: dict[str, list[dict]] = {label: [] for label in sources_w}
    skipped = dict.fromkeys(sources_w, 0)
    for name in tqdm(names, desc="MSO", unit="tensor", disable=not progress):
        try:
            rows_against = compare(name)
            for label, source_w in sources_w.items():
                if name in members[label]:
                    rows, left_out = rows_against(cache.get(source_w, name))
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
                stacklevel=3,
            )
    return tables


def mso_table(
    source_v: Subspaces,
    source_w: Subspaces,
    etas: Sequence[float] = ETAS,
    side: Side = "left",
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
        overlap = sum(r["mso"] for r in members) / n
        baseline = sum(r["baseline"] for r in members) / n
        entry = {by: key[0]} if by != "model" else {}
        entry.update(
            {
                "eta": key[1],
                "tensors": n,
                "mso": overlap,
                "baseline": baseline,
                "ratio": overlap / baseline,
                "angle_deg": sum(r["angle_deg"] for r in members) / n,
            }
        )
        out.append(entry)
    return out
