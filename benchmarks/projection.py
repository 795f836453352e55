"""Online projection overhead, basis build memory, and basis size; JSON out.

1. Step time with OnlineProjection / without, in one run: optimizer steps are timed with and without
   the projection in alternation (so drift in machine speed hits both alike), on the tiny model and on
   SmolLM2-135M. Reported beside the floor 2·min(k, m−k)/(3T) that the FLOP counts allow
   (≈ 4·min(k, m−k)·m·n for the projection against ≈ 6·m·n·T for the step, T = tokens per step).
2. Basis build peak memory: in a fresh process, with glibc returning freed blocks to the OS, the
   anonymous RSS (file-backed pages of the memory-mapped checkpoints are left out, the OS drops them at
   will) sampled during the build, above the RSS before it, less the basis it returns, against the
   largest (tuned, base) tensor pair.
3. Basis bytes / projected weight bytes for each frac.

    python benchmarks/projection.py [--out benchmarks/results/projection.json] [--quick] [--parts memory size]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from safeproj.callbacks.online_projection import OnlineProjection
from safeproj.callbacks.subspace import find_targets
from safeproj.core.basis import build_basis
from safeproj.core.deltas import CheckpointDelta, select_names
from safeproj.core.spectrum import factorize
from safeproj.io import write_json
from safeproj.model.loading import load_model, resolve

PARTS = ("overhead", "memory", "size")


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakSampler:
    """Peak anonymous RSS while the block runs (sampled every 2 ms)."""

    def __enter__(self):
        self.base = rss_anon()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon())


def perturbed_copy(base_dir: str, out_dir: Path, scale: float = 1e-3, seed: int = 0) -> Path:
    """A 'tuned' checkpoint: the base plus Gaussian noise on the projection matrices."""
    out_dir.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = load_file(str(Path(base_dir) / "model.safetensors"))
    for name in select_names(list(tensors)):
        t = tensors[name]
        tensors[name] = t + scale * t.std() * torch.randn(t.shape, generator=g)
    save_file(tensors, str(out_dir / "model.safetensors"))
    return out_dir


def step_overhead(model_name: str, frac: float, batch: int, length: int, pairs: int, tmp: Path) -> dict:
    """Alternating optimizer steps with/without projection; ratio of median times."""
    model, _ = load_model(model_name)
    model.train()
    base = resolve(model_name)
    tuned = perturbed_copy(base, tmp / f"tuned-{model_name}")
    basis = build_basis(CheckpointDelta(str(tuned), base), frac=frac, progress=False)
    cb = OnlineProjection("unused", keep="orthogonal", on="update", frac=frac)
    cb.basis, cb.targets = basis, find_targets(model, basis)
    cb._initial = {t.name: t.weight.detach().clone() for t in cb.targets}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, model.config.vocab_size, (batch, length), generator=g)
    inputs = {"input_ids": ids, "labels": ids}

    def step(project: bool) -> float:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        model(**inputs).loss.backward()
        opt.step()
        if project:
            cb.project_weights()
        return time.perf_counter() - t0

    step(False), step(True)  # warm-up
    plain, projected = [], []
    for i in range(pairs):
        order = (False, True) if i % 2 == 0 else (True, False)
        for flag in order:
            (projected if flag else plain).append(step(flag))
    proj_only = []
    for _ in range(max(3, pairs)):
        t0 = time.perf_counter()
        cb.project_weights()
        proj_only.append(time.perf_counter() - t0)
    tokens = batch * length
    floor = sum(4 * min(e.left.k, e.left.dim - e.left.k) * e.shape[0] * e.shape[1] for e in basis.entries.values())
    step_flops = sum(6 * e.shape[0] * e.shape[1] * tokens for e in basis.entries.values())
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return {
        "model": model_name,
        "frac": frac,
        "tokens_per_step": tokens,
        "step_s_without": med(plain),
        "step_s_with": med(projected),
        "ratio": med(projected) / med(plain),
        "projection_s": med(proj_only),
        "projection_over_step": med(proj_only) / med(plain),
        "flop_floor": floor / step_flops,
        "target": 1.03,
    }


def _build_peak(tuned: str, base: str, frac: float) -> tuple[int, int, int]:
    """(peak anonymous RSS above the start of the build, basis bytes, largest tensor pair bytes)."""
    source = CheckpointDelta(tuned, base)
    shapes = {n: torch.Size(source.shape(n)) for n in source.names()}
    largest = max(4 * s.numel() for s in shapes.values())
    # One-time library workspaces (BLAS/LAPACK buffers, thread pools) belong to the process, not the build.
    factorize(torch.randn(max(shapes.values(), key=lambda s: s.numel())))
    with PeakSampler() as mem:
        basis = build_basis(source, frac=frac, progress=False)
    return mem.peak - mem.base, basis.nbytes(), 2 * largest


def build_memory(model_name: str, frac: float, tmp: Path) -> dict:
    """The build's transient memory, measured in a fresh process: in this one, memory that earlier
    phases freed is reused by the allocator and would hide the build's own peak."""
    base = resolve(model_name)
    tuned = perturbed_copy(base, tmp / f"tuned-mem-{model_name}")
    # glibc serves every allocation above 64 KiB by mmap and unmaps it on free, so the RSS follows live
    # memory instead of the heap's high-water mark (its default threshold adapts upwards at run time).
    previous = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    try:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            peak, basis_bytes, pair = pool.apply(_build_peak, (str(tuned), base, frac))
    finally:
        if previous is None:
            os.environ.pop("MALLOC_MMAP_THRESHOLD_")
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = previous
    transient = max(0, peak - basis_bytes)  # below zero only when the build fits in pages already mapped
    return {
        "model": model_name,
        "frac": frac,
        "peak_anon_rss_above_start_bytes": peak,
        "basis_bytes": basis_bytes,
        "transient_bytes": transient,
        "largest_pair_bytes": pair,
        "transient_over_largest_pair": transient / pair,
        "target": 1.3,
    }


def basis_sizes(model_name: str, fracs, tmp: Path) -> list[dict]:
    base = resolve(model_name)
    tuned = perturbed_copy(base, tmp / f"tuned-size-{model_name}")
    source = CheckpointDelta(str(tuned), base)
    weight_bytes = sum(4 * torch.Size(source.shape(n)).numel() for n in source.names())
    rows = []
    for frac in fracs:
        basis = build_basis(source, frac=frac, progress=False)
        rows.append({"model": model_name, "frac": frac, "basis_over_weights": basis.nbytes() / weight_bytes})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/projection.json")
    parser.add_argument("--quick", action="store_true", help="tiny model only")
    parser.add_argument("--fracs", type=float, nargs="+", default=[0.01, 0.25, 0.5, 0.99], help="fracs for step timing")
    parser.add_argument("--size-fracs", type=float, nargs="+", default=[0.01, 0.25, 0.5, 0.75, 0.99])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to measure")
    args = parser.parse_args()
    torch.manual_seed(0)
    models = ["tiny"]
    try:
        from safeproj.model.loading import smollm_gguf_path

        smollm_gguf_path()
        if not args.quick:
            models.append("smollm2-135m")
    except FileNotFoundError:
        pass
    result = {"torch_threads": torch.get_num_threads(), "overhead": [], "build_memory": [], "basis_size": []}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for name in models:
            big = name != "tiny"
            for frac in args.fracs if "overhead" in args.parts else ():
                row = step_overhead(name, frac, batch=4, length=256 if big else 128, pairs=3 if big else 10, tmp=tmp)
                result["overhead"].append(row)
                print(json.dumps(row))
            if "memory" in args.parts:
                result["build_memory"].append(build_memory(name, 0.5, tmp))
                print(json.dumps(result["build_memory"][-1]))
            if "size" in args.parts:
                result["basis_size"] += basis_sizes(name, args.size_fracs, tmp)
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
