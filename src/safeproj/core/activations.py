"""Activation-space analyses of harmful vs benign prompts, per layer and per recorded step.

For each layer, with H (n_h × d) and B (n_b × d) the recorded activations of the two prompt sets (by
default harmful and benign requests of the same form, so that the contrast is harm, not topic or form):
- activation MSO: each set's subspace is the fewest left singular vectors of its d × n activation
  matrix holding an η share of its energy, uncentered (the paper's statistic: the shared mean
  direction counts) and centered (each set's mean removed: only the spread counts);
  MSO(V, W) = ‖Q_Vᵀ Q_W‖_F² / min(k_V, k_W), each beside its random baseline max(k_V, k_W) / d;
- the difference-of-means direction mean(H) − mean(B) and its norm;
- a linear probe (logistic regression) fitted on part of each set and scored on the held-out rest
  (stratified), with the held-out n and a Wilson 95 % interval of its accuracy;
- with a weight basis, how much of the difference-of-means direction lies in the kept subspace of
  that layer's output projections (o_proj, down_proj left factors): ‖P d‖ / ‖d‖ beside sqrt(k / d);
- how each of these changes from the first to the last recorded step.

All math goes through `safeproj.core` (one SVD and MSO path for weights and activations). Recording
and the files on disk are `safeproj.model.activations` and `safeproj.model.recordings`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

DEFAULT_ETAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
OUTPUT_PROJECTIONS = ("self_attn.o_proj", "mlp.down_proj")


# --------------------------------------------------------------------------------------------
# Pure math on (n × d) activation matrices


def _check_pair(harmful: torch.Tensor, benign: torch.Tensor) -> None:
    for name, x in (("harmful", harmful), ("benign", benign)):
        if x.ndim != 2 or x.shape[0] < 1:
            raise ValueError(f"{name} activations must be a non-empty (n, d) matrix, got shape {tuple(x.shape)}")
    if harmful.shape[1] != benign.shape[1]:
        raise ValueError(f"harmful and benign activations differ in width: {harmful.shape[1]} vs {benign.shape[1]}")


def energy_subspace(acts: torch.Tensor, eta: float, center: bool = False) -> torch.Tensor:
    """Orthonormal d × k basis: the fewest left singular vectors of the d × n matrix holding η of its energy."""
    from safeproj.core.spectrum import k_for_energy, side_spectrum

    if not 0.0 < eta <= 1.0:
        raise ValueError(f"eta must be in (0, 1], got {eta}")
    x = acts.float()
    if center:
        x = x - x.mean(dim=0, keepdim=True)
    q, s = side_spectrum(x.T, side="left")  # (d, r), (r,)
    if float(s.square().sum()) == 0.0:
        raise ValueError("activations have no energy (all zero after centering?); need at least two distinct prompts")
    k = max(1, int(k_for_energy(s, eta)))
    return q[:, :k]


def activation_mso(
    harmful: torch.Tensor, benign: torch.Tensor, etas: Iterable[float] = DEFAULT_ETAS, center: bool = False
) -> list[dict[str, float]]:
    """MSO of the η-energy subspaces of two activation sets, with the random baseline, per η."""
    from safeproj.core.overlap import mso, random_baseline

    _check_pair(harmful, benign)
    d = harmful.shape[1]
    rows = []
    for eta in etas:
        qh = energy_subspace(harmful, eta, center)
        qb = energy_subspace(benign, eta, center)
        kh, kb = qh.shape[1], qb.shape[1]
        rows.append(
            {
                "eta": float(eta),
                "centered": bool(center),
                "mso": float(mso(qh, qb)),
                "baseline": float(random_baseline(kh, kb, d)),
                "k_harmful": kh,
                "k_benign": kb,
            }
        )
    return rows


def diff_of_means(harmful: torch.Tensor, benign: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(unit direction of mean(harmful) − mean(benign), its norm); a zero difference gives a zero vector."""
    _check_pair(harmful, benign)
    diff = harmful.float().mean(0) - benign.float().mean(0)
    norm = float(diff.norm())
    return (diff / norm if norm > 0 else diff), norm


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95 % by default); (nan, nan) for n = 0."""
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def group_split(
    labels: Sequence[int], groups: Sequence[str], test_size: float, seed: int = 0
) -> tuple[list[int], list[int]]:
    """(train, test) row indices with no group on both sides: within each class, whole groups (shuffled,
    seeded) go to the test side until it holds `test_size` of the class's rows, at least one group each.

    Prompts made from one template over one act share that act; a probe tested on acts it was trained
    on partly recognises the acts themselves.
    """
    if len(groups) != len(labels):
        raise ValueError(f"groups has {len(groups)} entries for {len(labels)} rows")
    rng = np.random.default_rng(seed)
    train: list[int] = []
    test: list[int] = []
    for label in sorted(set(labels)):
        members: dict[str, list[int]] = {}
        for i, (row_label, group) in enumerate(zip(labels, groups)):
            if row_label == label:
                members.setdefault(str(group), []).append(i)
        if len(members) < 2:
            raise ValueError(
                f"the probe holds out whole groups but class {label} has {len(members)} group(s); give prompts "
                "from at least 2 groups (acts) per set"
            )
        names = sorted(members)
        order = rng.permutation(len(names))
        target = test_size * sum(len(rows) for rows in members.values())
        held = 0
        for rank, index in enumerate(order):
            rows = members[names[index]]
            if rank < len(names) - 1 and (held == 0 or held + len(rows) / 2 <= target):
                test += rows
                held += len(rows)
            else:
                train += rows
    return sorted(train), sorted(test)


def linear_probe(
    harmful: torch.Tensor,
    benign: torch.Tensor,
    test_size: float = 0.5,
    seed: int = 0,
    groups: tuple[Sequence[str], Sequence[str]] | None = None,
) -> dict:
    """A logistic-regression probe fitted on part of each set and scored on the rest.

    Without `groups` the held-out share is a stratified random split of prompts. With (harmful groups,
    benign groups), e.g. the act each templated prompt is made from, whole groups are held out
    (`group_split`), so the probe is scored on acts it never saw.

    Returns `probe_accuracy` (held-out), `probe_ci_low` / `probe_ci_high` (Wilson 95 %), `probe_n_train`
    and `probe_n_test` (rows of both sets together), and `probe_test_groups` (held-out groups, 0 when the
    split is by prompt).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    _check_pair(harmful, benign)
    check_probe_sizes(len(harmful), len(benign), test_size)
    x = torch.cat([harmful, benign]).float().numpy()
    y = [1] * len(harmful) + [0] * len(benign)
    if groups is None:
        x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=test_size, stratify=y, random_state=seed)
        test_groups = 0
    else:
        labels = [f"harmful:{g}" for g in groups[0]] + [f"benign:{g}" for g in groups[1]]
        train, test = group_split(y, labels, test_size, seed)
        x_train, x_test = x[train], x[test]
        y_train, y_test = [y[i] for i in train], [y[i] for i in test]
        test_groups = len({labels[i] for i in test})
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    probe.fit(x_train, y_train)
    correct = sum(int(p == t) for p, t in zip(probe.predict(x_test), y_test))
    low, high = wilson_interval(correct, len(y_test))
    return {
        "probe_accuracy": correct / len(y_test),
        "probe_ci_low": low,
        "probe_ci_high": high,
        "probe_n_train": len(y_train),
        "probe_n_test": len(y_test),
        "probe_test_groups": test_groups,
    }


def check_test_size(test_size: float) -> None:
    if isinstance(test_size, bool) or not isinstance(test_size, (int, float)) or not 0.0 < test_size < 1.0:
        raise ValueError(f"the probe's test_size must be in (0, 1), got {test_size!r}")


def check_probe_sizes(n_harmful: int, n_benign: int, test_size: float) -> None:
    """ValueError unless each set has at least 2 rows and keeps some for training after the held-out share."""
    check_test_size(test_size)
    sizes = (n_harmful, n_benign)
    if min(sizes) < 2 or any(math.ceil(test_size * n) >= n for n in sizes):
        raise ValueError(
            f"the probe holds out {test_size:g} of each set and needs at least 2 prompts per set with some left "
            f"for training; got {n_harmful} harmful, {n_benign} benign"
        )


def subspace_share(direction: torch.Tensor, q: torch.Tensor, complement: bool = False) -> float:
    """‖P d‖ / ‖d‖ for P the projector onto range(q), or onto its complement when `complement`."""
    if q.ndim != 2 or q.shape[0] != direction.shape[-1]:
        raise ValueError(f"basis of shape {tuple(q.shape)} does not act on vectors of size {direction.shape[-1]}")
    d = direction.double()
    norm = float(d.norm())
    if norm == 0.0:
        return float("nan")
    inside = float((q.double().T @ d).norm()) / norm
    if not complement:
        return inside
    # ‖P d‖² = ‖d‖² − ‖Q⊥ᵀ d‖²: near 0 this carries ~sqrt(fp32 eps) ≈ 3e-4 (Q is fp32).
    return math.sqrt(max(0.0, 1.0 - inside**2))


def weight_alignment(direction: torch.Tensor, basis, layer: int) -> dict[str, float]:
    """‖P_k d‖ / ‖d‖ for the left factors of `layer`'s o_proj and down_proj in a Basis, with sqrt(k / d)."""
    out: dict[str, float] = {}
    for proj in OUTPUT_PROJECTIONS:
        pattern = re.compile(rf"(^|\.)layers\.{layer}\.{re.escape(proj)}\.weight$")
        names = [name for name in basis.entries if pattern.search(name)]
        short = proj.split(".")[-1]
        if not names:
            continue
        factor = basis.entries[names[0]].left
        if factor is None:
            continue
        if factor.dim != direction.shape[-1]:
            raise ValueError(
                f"basis entry {names[0]} acts on size {factor.dim}, activations have size {direction.shape[-1]}"
            )
        out[f"cos_{short}"] = subspace_share(direction, factor.Q, factor.complement)
        out[f"random_{short}"] = math.sqrt(factor.k / factor.dim)
        out[f"k_{short}"] = int(factor.k)
    return out


def direction_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    if na == 0.0 or nb == 0.0:
        return float("nan")
    return float(a.float() @ b.float()) / (na * nb)


# --------------------------------------------------------------------------------------------
# One layer, and changes across steps


def analyse_layer(
    harmful: torch.Tensor,
    benign: torch.Tensor,
    etas: Sequence[float] = DEFAULT_ETAS,
    basis=None,
    layer: int | None = None,
    seed: int = 0,
    probe_test_size: float = 0.5,
    groups: tuple[Sequence[str], Sequence[str]] | None = None,
) -> tuple[list[dict], dict, torch.Tensor]:
    """(MSO rows for both centerings, one summary row, the difference-of-means direction); `groups` as in
    `linear_probe`."""
    mso_rows = activation_mso(harmful, benign, etas, center=False) + activation_mso(harmful, benign, etas, center=True)
    direction, norm = diff_of_means(harmful, benign)
    row: dict[str, Any] = {
        "n_harmful": int(harmful.shape[0]),
        "n_benign": int(benign.shape[0]),
        "hidden": int(harmful.shape[1]),
        "diff_norm": norm,
        **linear_probe(harmful, benign, probe_test_size, seed, groups),
    }
    if basis is not None and layer is not None:
        row.update(weight_alignment(direction, basis, layer))
    return mso_rows, row, direction


# Columns of a layer row that describe it rather than measure it: no first-vs-last change for these.
_DESCRIPTIVE = (
    "step",
    "layer",
    "n_harmful",
    "n_benign",
    "hidden",
    "probe_n_train",
    "probe_n_test",
    "probe_test_groups",
)


def change_rows(layer_rows: Sequence[Mapping], mso_rows: Sequence[Mapping] = ()) -> list[dict]:
    """First vs last recorded step, per layer and metric: {layer, metric, first, last, change}.

    MSO metrics are named `mso_{uncentered|centered}@η`, their random baselines
    `mso_{uncentered|centered}_baseline@η`.
    """
    if not layer_rows:
        return []
    steps = sorted({r["step"] for r in layer_rows})
    first, last = steps[0], steps[-1]
    out = []
    metrics = [k for k in layer_rows[0] if k not in _DESCRIPTIVE and not k.startswith(("k_", "random_", "probe_ci_"))]
    by_key = {(r["step"], r["layer"]): r for r in layer_rows}
    mso_by_key = {(r["step"], r["layer"], r["centered"], r["eta"]): r for r in mso_rows}
    for layer in sorted({r["layer"] for r in layer_rows}):
        a, b = by_key.get((first, layer)), by_key.get((last, layer))
        if a is None or b is None:
            continue
        pairs = [(m, a.get(m), b.get(m)) for m in metrics]
        for centered, eta in sorted({(c, e) for (_, at, c, e) in mso_by_key if at == layer}):
            before, after = (mso_by_key.get((s, layer, centered, eta)) for s in (first, last))
            if before is None or after is None:
                continue
            kind = "centered" if centered else "uncentered"
            pairs.append((f"mso_{kind}@{eta:g}", before["mso"], after["mso"]))
            if "baseline" in before and "baseline" in after:
                pairs.append((f"mso_{kind}_baseline@{eta:g}", before["baseline"], after["baseline"]))
        for metric, x, y in pairs:
            if x is None or y is None:
                continue
            out.append(
                {
                    "layer": layer,
                    "metric": metric,
                    "first_step": first,
                    "last_step": last,
                    "first": float(x),
                    "last": float(y),
                    "change": float(y) - float(x),
                }
            )
    return out
