"""Cost of the spectrum behind k(η): full SVD against the eigenvalues of the smaller Gram matrix.

For weight shapes of 1-7B models, times on one machine in one run (so ratios are comparable):
- svd:            torch.linalg.svd(Δ, full_matrices=False), float32 (vectors and values)
- svdvals:        torch.linalg.svdvals(Δ), float32 (values only)
- gram32_vals:    eigvalsh of the smaller Gram matrix in float32 (values only)
- gram64_vals:    eigvalsh of the smaller Gram matrix in float64, what `energy_spectrum` does
- gram64_vectors: `side_spectrum(Δ, method="gram")`, the vectors of the smaller side (what "auto" does)
and the largest relative error of each energy curve c_k = Σ_{i<k} σ_i² / Σ σ_i² against the SVD's.
Test matrices have a decaying spectrum like a fine-tuning delta (Gaussian with columns scaled by
j^-0.6). svdvals is skipped above 4096×4096, where it costs about as much as the SVD, to keep the
default run near 3 minutes on 2 cores. On a machine shared with other jobs, `--threads 1` avoids
thread-pool stalls that distort the timings.
Usage: python benchmarks/overlap.py [--out PATH] [--shapes 2048x2048 4096x11008] [--repeats N] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from safeproj.core.spectrum import side_spectrum
from safeproj.io import write_json

DEFAULT_SHAPES = ["2048x2048", "2048x8192", "4096x4096", "4096x11008"]
BIG = 4096 * 4096  # shapes at least this large are timed once


def delta_like(m: int, n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scale = torch.arange(1, n + 1, dtype=torch.float32).pow(-0.6)
    return torch.randn(m, n, generator=gen) * scale


def gram_vals(M: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    A = M.to(dtype)
    gram = A @ A.T if A.shape[0] <= A.shape[1] else A.T @ A
    return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0).sqrt()


def timed(fn, repeats: int):
    """(best seconds, last result)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def energy_curve(S: torch.Tensor) -> torch.Tensor:
    e = S.double().square().cumsum(0)
    return e / e[-1]


def run_shape(m: int, n: int, repeats: int) -> dict:
    M = delta_like(m, n)
    reps = 1 if m * n >= BIG else repeats
    methods = {
        "svd": lambda: torch.linalg.svd(M, full_matrices=False)[1],
        "svdvals": lambda: torch.linalg.svdvals(M),
        "gram32_vals": lambda: gram_vals(M, torch.float32),
        "gram64_vals": lambda: gram_vals(M, torch.float64),
        "gram64_vectors": lambda: side_spectrum(M, "left" if m <= n else "right", method="gram")[1],
    }
    if m * n > BIG:
        del methods["svdvals"]
    seconds, spectra = {}, {}
    for key, fn in methods.items():
        seconds[key], spectra[key] = timed(fn, reps)
        print(f"  {m}x{n} {key}: {seconds[key]:.2f} s", file=sys.stderr, flush=True)
    reference = energy_curve(spectra["svd"])
    errors = {
        key: float(((energy_curve(S) - reference).abs() / reference).max())
        for key, S in spectra.items()
        if key != "svd"
    }
    return {
        "shape": [m, n],
        "repeats": reps,
        "seconds": seconds,
        "svd_over": {key: seconds["svd"] / s for key, s in seconds.items() if key != "svd"},
        "energy_curve_max_rel_error_vs_svd": errors,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "overlap.json"))
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="MxN shapes")
    parser.add_argument("--repeats", type=int, default=3, help="repeats for shapes below 4096x4096 (best is kept)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    shapes = [tuple(int(x) for x in s.lower().split("x")) for s in args.shapes]

    torch.linalg.svd(torch.randn(64, 64))  # load LAPACK before timing
    torch.linalg.eigh(torch.randn(64, 64, dtype=torch.float64))
    load = os.getloadavg()
    start = time.perf_counter()
    rows = [run_shape(m, n, args.repeats) for m, n in shapes]
    result = {
        "benchmark": "spectrum for k(eta): SVD vs Gram eigenvalues",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average_at_start": load,
        "machine": platform.machine(),
        "processor": platform.processor(),
        "total_seconds": time.perf_counter() - start,
        "shapes": rows,
    }
    write_json(args.out, result)
    summary = {"{}x{}".format(*r["shape"]): r["svd_over"] for r in rows}
    print(json.dumps(summary, indent=2))
    return result


if __name__ == "__main__":
    main()
