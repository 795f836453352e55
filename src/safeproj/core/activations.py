"""Activation-space analyses of harmful vs useful prompts, per layer and per recorded step.

For each layer, with H (n_h × d) and U (n_u × d) the recorded activations of the two prompt sets:
- activation MSO: each set's subspace is the fewest left singular vectors of its d × n activation
  matrix holding an η share of its energy (uncentered, and centered with the set mean removed);
  MSO(V, W) = ‖Q_Vᵀ Q_W‖_F² / min(k_V, k_W), beside the random baseline max(k_V, k_W) / d;
- the difference-of-means direction mean(H) − mean(U) and its norm;
- a linear probe (logistic regression, stratified held-out split) and its held-out accuracy;
- with a weight basis, how much of the difference-of-means direction lies in the kept subspace of
  that layer's output projections (o_proj, down_proj left factors): ‖P d‖ / ‖d‖ beside sqrt(k / d);
- how each of these changes from the first to the last recorded step.

All math goes through `safeproj.core` (one SVD and MSO path for weights and activations).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safeproj.io import write_json

DEFAULT_ETAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
OUTPUT_PROJECTIONS = ("self_attn.o_proj", "mlp.down_proj")
MANIFEST = "manifest.json"
_SHARD = re.compile(r"^(?P<set>[A-Za-z0-9_-]+)_layer(?P<layer>\d+)_shard(?P<shard>\d+)\.safetensors$")
_STEP = re.compile(r"^step_(\d+)$")


# --------------------------------------------------------------------------------------------
# Reading recordings


def recorded_steps(out_dir: str | os.PathLike) -> list[int]:
    """Steps with a complete recording (a manifest) under `out_dir`, ascending."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    steps = []
    for child in out_dir.iterdir():
        match = _STEP.match(child.name)
        if match and (child / MANIFEST).is_file():
            steps.append(int(match.group(1)))
    return sorted(steps)


def step_manifest(out_dir: str | os.PathLike, step: int) -> dict:
    path = Path(out_dir) / f"step_{step}" / MANIFEST
    if not path.is_file():
        raise ValueError(f"no complete recording for step {step}: {path} is missing")
    return json.loads(path.read_text(encoding="utf-8"))


def load_activations(
    out_dir: str | os.PathLike, step: int, set_name: str, layer: int
) -> tuple[torch.Tensor, list[int]]:
    """(rows × hidden fp32, prompt ids) of one prompt set at one layer, rows ordered by prompt id."""
    step_dir = Path(out_dir) / f"step_{step}"
    shards = []
    for path in step_dir.glob(f"{set_name}_layer{layer}_shard*.safetensors"):
        match = _SHARD.match(path.name)
        if match and match.group("set") == set_name and int(match.group("layer")) == layer:
            shards.append((int(match.group("shard")), path))
    if not shards:
        raise ValueError(f"no activations for set {set_name!r}, layer {layer} in {step_dir}")
    tensors, ids = [], []
    for _, path in sorted(shards):
        with safe_open(str(path), framework="pt") as handle:
            ids += json.loads(handle.metadata()["prompt_ids"])
            tensors.append(handle.get_tensor("activations").float())
    rows = torch.cat(tensors)
    order = sorted(range(len(ids)), key=ids.__getitem__)
    return rows[order], [ids[i] for i in order]


# --------------------------------------------------------------------------------------------
# Pure math on (n × d) activation matrices


def _check_pair(harmful: torch.Tensor, useful: torch.Tensor) -> None:
    for name, x in (("harmful", harmful), ("useful", useful)):
        if x.ndim != 2 or x.shape[0] < 1:
            raise ValueError(f"{name} activations must be a non-empty (n, d) matrix, got shape {tuple(x.shape)}")
    if harmful.shape[1] != useful.shape[1]:
        raise ValueError(f"harmful and useful activations differ in width: {harmful.shape[1]} vs {useful.shape[1]}")


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
    harmful: torch.Tensor, useful: torch.Tensor, etas: Iterable[float] = DEFAULT_ETAS, center: bool = False
) -> list[dict[str, float]]:
    """MSO of the η-energy subspaces of two activation sets, with the random baseline, per η."""
    from safeproj.core.overlap import mso, random_baseline

    _check_pair(harmful, useful)
    d = harmful.shape[1]
    rows = []
    for eta in etas:
        qh = energy_subspace(harmful, eta, center)
        qu = energy_subspace(useful, eta, center)
        kh, ku = qh.shape[1], qu.shape[1]
        rows.append(
            {
                "eta": float(eta),
                "centered": bool(center),
                "mso": float(mso(qh, qu)),
                "baseline": float(random_baseline(kh, ku, d)),
                "k_harmful": kh,
                "k_useful": ku,
            }
        )
    return rows


def diff_of_means(harmful: torch.Tensor, useful: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(unit direction of mean(harmful) − mean(useful), its norm); a zero difference gives a zero vector."""
    _check_pair(harmful, useful)
    diff = harmful.float().mean(0) - useful.float().mean(0)
    norm = float(diff.norm())
    return (diff / norm if norm > 0 else diff), norm


def probe_accuracy(harmful: torch.Tensor, useful: torch.Tensor, test_size: float = 0.25, seed: int = 0) -> float:
    """Held-out accuracy of a logistic-regression probe separating the two sets (stratified split)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    _check_pair(harmful, useful)
    if not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size must be in (0, 1), got {test_size}")
    n_test = [math.ceil(test_size * n) for n in (len(harmful), len(useful))]
    if min(len(harmful), len(useful)) < 2 or min(n_test) >= min(len(harmful), len(useful)):
        raise ValueError(
            "the probe needs at least 2 prompts per set with some left for training; "
            f"got {len(harmful)} harmful, {len(useful)} useful"
        )
    x = torch.cat([harmful, useful]).float().numpy()
    y = [1] * len(harmful) + [0] * len(useful)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=test_size, stratify=y, random_state=seed)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    probe.fit(x_train, y_train)
    return float(probe.score(x_test, y_test))


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
# Whole recordings


def analyse_layer(
    harmful: torch.Tensor,
    useful: torch.Tensor,
    etas: Sequence[float] = DEFAULT_ETAS,
    basis=None,
    layer: int | None = None,
    seed: int = 0,
) -> tuple[list[dict], dict, torch.Tensor]:
    """(MSO rows for both centerings, one summary row, the difference-of-means direction)."""
    mso_rows = activation_mso(harmful, useful, etas, center=False) + activation_mso(harmful, useful, etas, center=True)
    direction, norm = diff_of_means(harmful, useful)
    row: dict[str, Any] = {
        "n_harmful": int(harmful.shape[0]),
        "n_useful": int(useful.shape[0]),
        "hidden": int(harmful.shape[1]),
        "diff_norm": norm,
        "probe_accuracy": probe_accuracy(harmful, useful, seed=seed),
    }
    if basis is not None and layer is not None:
        row.update(weight_alignment(direction, basis, layer))
    return mso_rows, row, direction


def analyse_recordings(
    out_dir: str | os.PathLike,
    steps: Sequence[int] | None = None,
    etas: Sequence[float] = DEFAULT_ETAS,
    basis=None,
    harmful_set: str = "harmful",
    useful_set: str = "useful",
    seed: int = 0,
) -> dict[str, list[dict]]:
    """Analyse every (step, layer) recorded under `out_dir`; loads one layer of one step at a time.

    Returns {"mso": rows per (step, layer, centered, η), "layers": one row per (step, layer),
    "changes": first vs last step per (layer, metric)}.
    """
    available = recorded_steps(out_dir)
    steps = available if steps is None else sorted(int(s) for s in steps)
    missing = [s for s in steps if s not in available]
    if missing:
        raise ValueError(f"steps {missing} have no complete recording in {out_dir} (have {available})")
    if not steps:
        raise ValueError(f"no recorded steps in {out_dir}")
    mso_rows: list[dict] = []
    layer_rows: list[dict] = []
    first_direction: dict[int, torch.Tensor] = {}
    for step in steps:
        manifest = step_manifest(out_dir, step)
        for name in (harmful_set, useful_set):
            if name not in manifest["sets"]:
                raise ValueError(
                    f"step {step} has no prompt set {name!r}; recorded sets are {sorted(manifest['sets'])}"
                )
        for layer in manifest["layers"]:
            harmful, _ = load_activations(out_dir, step, harmful_set, layer)
            useful, _ = load_activations(out_dir, step, useful_set, layer)
            rows, row, direction = analyse_layer(harmful, useful, etas, basis, layer, seed)
            first_direction.setdefault(layer, direction)
            key = {"step": step, "layer": layer}
            mso_rows += [{**key, **r} for r in rows]
            drift = direction_cosine(direction, first_direction[layer])
            layer_rows.append({**key, **row, "direction_cosine_to_first": drift})
    return {"mso": mso_rows, "layers": layer_rows, "changes": change_rows(layer_rows, mso_rows)}


def change_rows(layer_rows: Sequence[Mapping], mso_rows: Sequence[Mapping] = ()) -> list[dict]:
    """First vs last recorded step, per layer and metric: {layer, metric, first, last, change}."""
    if not layer_rows:
        return []
    steps = sorted({r["step"] for r in layer_rows})
    first, last = steps[0], steps[-1]
    out = []
    fixed = ("step", "layer", "n_harmful", "n_useful", "hidden")
    metrics = [k for k in layer_rows[0] if k not in fixed and not k.startswith(("k_", "random_"))]
    by_key = {(r["step"], r["layer"]): r for r in layer_rows}
    mso_by_key = {(r["step"], r["layer"], r["centered"], r["eta"]): r["mso"] for r in mso_rows}
    for layer in sorted({r["layer"] for r in layer_rows}):
        a, b = by_key.get((first, layer)), by_key.get((last, layer))
        if a is None or b is None:
            continue
        pairs = [(m, a.get(m), b.get(m)) for m in metrics]
        for centered, eta in sorted({(c, e) for (s, l, c, e) in mso_by_key if l == layer}):
            label = f"mso_{'centered' if centered else 'uncentered'}@{eta:g}"
            before, after = (mso_by_key.get((s, layer, centered, eta)) for s in (first, last))
            pairs.append((label, before, after))
        for metric, x, y in pairs:
            if x is None or y is None:
                continue
            out.append({"layer": layer, "metric": metric, "first_step": first, "last_step": last,
                        "first": float(x), "last": float(y), "change": float(y) - float(x)})
    return out


# --------------------------------------------------------------------------------------------
# Outputs


def plot_mso(mso_rows: Sequence[Mapping], path: str | os.PathLike) -> Path:
    """MSO vs η, one panel per layer: first and last step, uncentered and centered, with baselines."""
    from safeproj.plots import new_figure, save_png

    layers = sorted({r["layer"] for r in mso_rows})
    steps = sorted({r["step"] for r in mso_rows})
    shown = [steps[0]] if len(steps) == 1 else [steps[0], steps[-1]]
    cols = min(4, len(layers))
    nrows = math.ceil(len(layers) / cols)
    fig = new_figure(width=3.6 * cols + 0.6, height=3.0 * nrows + 0.6)
    for i, layer in enumerate(layers):
        ax = fig.add_subplot(nrows, cols, i + 1)
        for j, step in enumerate(shown):
            for centered, style in ((False, "-"), (True, "--")):
                sel = [r for r in mso_rows if (r["layer"], r["step"], r["centered"]) == (layer, step, centered)]
                sel.sort(key=lambda r: r["eta"])
                if not sel:
                    continue
                eta = [r["eta"] for r in sel]
                label = f"step {step}{' centered' if centered else ''}"
                ax.plot(eta, [r["mso"] for r in sel], style, marker="o", markersize=3, color=f"C{j}", label=label)
                ax.plot(eta, [r["baseline"] for r in sel], style, color=f"C{j}", alpha=0.3, linewidth=1)
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("η (energy share)")
        ax.set_ylabel("MSO harmful vs useful")
        ax.set_ylim(0, 1.05)
        ax.grid(True, alpha=0.3)
        if i == 0:
            ax.legend(fontsize="x-small")
    fig.suptitle("Activation MSO (faint: random baseline)")
    return save_png(fig, path)


def plot_layers(layer_rows: Sequence[Mapping], path: str | os.PathLike) -> Path:
    """Probe accuracy and difference-of-means norm vs layer, first vs last recorded step."""
    from matplotlib.ticker import MaxNLocator

    from safeproj.plots import new_figure, save_png

    steps = sorted({r["step"] for r in layer_rows})
    shown = [steps[0]] if len(steps) == 1 else [steps[0], steps[-1]]
    fig = new_figure(width=9.0, height=3.6)
    panels = (("probe_accuracy", "probe held-out accuracy"), ("diff_norm", "‖mean(harmful) − mean(useful)‖"))
    for k, (metric, label) in enumerate(panels):
        ax = fig.add_subplot(1, 2, k + 1)
        for j, step in enumerate(shown):
            sel = sorted((r for r in layer_rows if r["step"] == step), key=lambda r: r["layer"])
            xs, ys = [r["layer"] for r in sel], [r[metric] for r in sel]
            ax.plot(xs, ys, marker="o", color=f"C{j}", label=f"step {step}")
        if metric == "probe_accuracy":
            ax.axhline(0.5, color="gray", linestyle="--", linewidth=1, label="chance")
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    return save_png(fig, path)


def write_report(report: Mapping[str, Sequence[Mapping]], out_dir: str | os.PathLike) -> dict[str, Path]:
    """analysis.json plus mso_vs_eta.png and probe_by_layer.png under `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"analysis": out_dir / "analysis.json"}
    write_json(files["analysis"], {k: list(v) for k, v in report.items()}, default=_json_value)
    if report.get("mso"):
        files["mso_vs_eta"] = plot_mso(report["mso"], out_dir / "mso_vs_eta.png")
    if report.get("layers"):
        files["probe_by_layer"] = plot_layers(report["layers"], out_dir / "probe_by_layer.png")
    return files


def _json_value(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def summary_table(report: Mapping[str, Sequence[Mapping]], eta: float = 0.5) -> str:
    """A plain-text table: one line per (step, layer) with probe, diff norm and MSO at `eta`."""
    mso = {(r["step"], r["layer"], r["centered"]): r for r in report["mso"] if math.isclose(r["eta"], eta)}
    mso_col = "mso@" + format(eta, "g")
    header = f"{'step':>6} {'layer':>5} {'probe':>6} {'diff_norm':>10} {mso_col:>8} {'centered':>8} {'baseline':>8}"
    extra = sorted({k for r in report["layers"] for k in r if k.startswith("cos_")})
    header += "".join(f" {k:>14}" for k in extra)
    lines = [header]
    for r in report["layers"]:
        plain = mso.get((r["step"], r["layer"], False), {})
        centered = mso.get((r["step"], r["layer"], True), {})
        line = (
            f"{r['step']:>6} {r['layer']:>5} {r['probe_accuracy']:>6.3f} {r['diff_norm']:>10.4g} "
            f"{plain.get('mso', math.nan):>8.3f} {centered.get('mso', math.nan):>8.3f} "
            f"{plain.get('baseline', math.nan):>8.3f}"
        )
        for k in extra:
            rand = r.get(k.replace("cos_", "random_"), float("nan"))
            line += f" {r.get(k, float('nan')):>6.3f}/{rand:<7.3f}"
        lines.append(line)
    return "\n".join(lines)
