"""`safeproj basis`: build a subspace basis from a weight delta and save it as one safetensors file."""

from __future__ import annotations

from pathlib import Path

from safeproj.core.options import BasisOptions, BasisSide, Selection
from safeproj.model.subspaces import delta_source


def basis_command(
    delta: str,
    out: str,
    frac: float | None = None,
    eta: float | None = None,
    selection: Selection = "top",
    side: BasisSide = "left",
    seed: int = 0,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
) -> None:
    """Build a subspace basis from a weight delta and save it as one safetensors file.

    Args:
        delta: `TUNED,BASE` checkpoint dirs, a LoRA adapter dir, a finished run's checkpoint dir, or
            `safety:<preset>` (Δ_S of a preset, safety-tuned on first use).
        out: the basis file to write (`.safetensors`).
        frac: keep k = round(frac·min(m, n)) directions per matrix (0.5 unless eta is given).
        eta: instead of frac, keep the fewest directions holding this share of ‖Δ‖_F².
        selection: top, random-k (k random singular vectors of the same SVD) or random (Gaussian).
        side: left (the paper's choice), right or both.
        seed: seed of the random selections.
        include: regexes of tensor names (default: attention and MLP projections of decoder blocks).
        exclude: regexes of tensor names to leave out.
    """
    from safeproj.core.basis import build_basis_with

    if not out.endswith(".safetensors"):
        raise ValueError(f"--out {out!r}: a basis is written as a .safetensors file")
    options = BasisOptions(
        frac=frac, eta=eta, selection=selection, side=side, seed=seed, include=include, exclude=exclude
    )
    source = delta_source(delta, options.include, options.exclude)
    basis = build_basis_with(source, options)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    basis.save(out)
    kept = [e.energy_kept for e in basis.entries.values()]
    print(
        f"{out}: {len(basis.entries)} tensors, {basis.nbytes() / 2**20:.1f} MiB, "
        f"mean energy kept {sum(kept) / max(1, len(kept)):.3f}"
    )
