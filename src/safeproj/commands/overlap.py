"""`safeproj overlap`: Mode Subspace Overlap of two weight deltas, and optionally the energy one keeps of the other.

The math is in `safeproj.core.overlap` (MSO tables) and `safeproj.core.energy` (energy kept by P_k),
the figures in `safeproj.plots.overlap`; this module reads the two subspaces, writes the files and
prints a summary.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from safeproj.core.basis import Basis
from safeproj.core.energy import energy_retained
from safeproj.core.options import ETAS, FRACS, SELECTIONS, Side, check_fractions
from safeproj.core.overlap import aggregate, mso_table
from safeproj.core.spectra import SpectrumCache
from safeproj.io import write_rows
from safeproj.model.subspaces import load_subspaces
from safeproj.plots import overlap as overlap_plots


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


def overlap_command(
    a: str,
    b: str,
    etas: list[float] = list(ETAS),
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    modules: list[str] | None = None,
    out_dir: str = "runs/overlap",
    energy: bool = False,
    side: Side = "left",
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
    etas = check_fractions("eta", etas)
    cache = SpectrumCache(side=side, cache_dir=cache_dir)
    source_a = load_subspaces(a, include, exclude)
    source_b = load_subspaces(b, include, exclude)
    rows = mso_table(source_a, source_b, etas, side=side, modules=modules, cache=cache, progress=True)
    out = Path(out_dir)
    by_module, by_layer, model = (aggregate(rows, by) for by in ("module", "layer", "model"))
    title = f"MSO: {Path(a).name} vs {Path(b).name}"
    written = {
        "rows_csv": write_rows(rows, out / "mso.csv"),
        "rows_json": write_rows(rows, out / "mso.json"),
        "by_module": write_rows(by_module, out / "mso_by_module.csv"),
        "by_layer": write_rows(by_layer, out / "mso_by_layer.csv"),
        "model": write_rows(model, out / "mso_model.csv"),
        "mso_plot": overlap_plots.mso_vs_eta(by_module, model, out / "mso_vs_eta.png", title=title),
    }
    heat = overlap_plots.ratio_heatmap(by_layer, out / "mso_ratio_heatmap.png")
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
        pooled = [r for r in energy_rows if r["scope"] == "pooled"]
        written["energy_csv"] = write_rows(energy_rows, out / "energy.csv")
        written["energy_json"] = write_rows(energy_rows, out / "energy.json")
        written["energy_plot"] = overlap_plots.energy_kept(pooled, out / "energy_retained.png")
        print(f"share of ‖Δ_b‖² kept by subspaces of a ({side} side):")
        for row in pooled:
            print(
                f"  {row['selection']:<9} frac={row['frac']:<5g} share={row['share']:.4f} "
                f"(random subspace {row['random_share']:.4f})"
            )
    _log_to_wandb(a, b, out, {"model": model, "by_module": by_module}, written)
    print(f"wrote {out}")
    return {kind: str(path) for kind, path in written.items()}


def _log_to_wandb(a: str, b: str, out: Path, tables: dict[str, list[dict]], written: dict) -> None:
    """A `job_type=overlap` W&B run in `out`, in the group of the first run it compares (if any)."""
    from safeproj.runs import find_run_info
    from safeproj.wandb import command_run, log_images, log_table

    found = next((f for f in (find_run_info(p) for p in (a, b) if Path(p).exists()) if f is not None), None)
    with command_run("overlap", out, found[1] if found else None, {"a": a, "b": b}) as loggers:
        for key, rows in tables.items():
            log_table(loggers, f"overlap/{key}", rows)
        log_images(loggers, "overlap/plots", [str(p) for p in written.values() if str(p).endswith(".png")])
