"""Online projection overhead, basis build memory, and basis size; JSON out.

1. Step time with OnlineProjection / without, in one run: optimizer steps are timed with and without
   the projection in alternation (so drift in machine speed hits both alike), on the tiny model and on
   SmolLM2-135M, at one micro-batch per step and at --accumulate micro-batches per step (the paper's
   32×512 tokens on SmolLM2). Reported beside the floor 2·min(k, m−k)/(3T) that the FLOP counts
   allow (≈ 4·min(k, m−k)·m·n for the projection against ≈ 6·m·n·T for the step, T = tokens per
   optimizer step): the ratio can only approach 1 as T grows.
2. Basis build peak memory: in a fresh process, with glibc returning freed blocks to the OS, the
   anonymous RSS (file-backed pages of the memory-mapped checkpoints are left out, the OS drops them at
   will) sampled during the build, above the RSS before it, less the part of the basis finished at
   that moment, against the largest (tuned, base) tensor pair.
3. Basis bytes / projected weight bytes for each frac.
4. PosthocProjection peak memory: in a fresh process, the anonymous RSS sampled while its train-end
   work runs (reference spectra, then each variant, every selection at --posthoc-fracs, put into the
   model and restored; no evaluator), above the RSS of the trained model, against the model's bytes.
5. Sharded (FSDP2) projection traffic per optimizer step, counted from the basis: the left side
   all-reduces one k×n float32 product per tensor (the right side sends nothing), against the float32
   gradient reduce-scatter of the whole model (and against FSDP2's whole step, whose two weight
   all-gathers send twice the reduce-scatter again). Ring collectives send 2(p−1)/p of an all-reduce's
   payload and (p−1)/p of a reduce-scatter's per rank, so the ratio of bytes on the wire does not
   depend on the number of processes p.

    python benchmarks/projection.py [--out benchmarks/results/projection.json] [--quick] [--parts memory size posthoc]
"""

from __future__ import annotations

import argparse
import array
import bisect
import json
import multiprocessing
import os
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from safeproj.core.basis import build_basis
from safeproj.core.deltas import CheckpointDelta, select_names
from safeproj.core.online import StepProjector
from safeproj.core.targets import find_targets
from safeproj.io import write_json
from safeproj.model.loading import load_model, resolve

PARTS = ("overhead", "memory", "size", "posthoc", "sharded")
PART_KEYS = {"overhead": "overhead", "memory": "build_memory", "size": "basis_size", "posthoc": "posthoc_memory",
             "sharded": "sharded_traffic"}  # fmt: skip


def rss_anon() -> int:
    with open("/proc/self/status", "rb") as f:
        return _rss_anon(f.read())


def _rss_anon(status: bytes) -> int:
    start = status.index(b"RssAnon:") + len(b"RssAnon:")
    return int(status[start : status.index(b"kB", start)]) * 1024


class MemoryTrace:
    """Anonymous RSS sampled every 2 ms while the block runs, as (time, bytes) pairs.

    The sampler keeps its own allocations out of the count: rows go to a buffer filled before the
    start is read, and /proc is read through a descriptor opened once.
    """

    def __init__(self, capacity: int = 1 << 17):
        self._rows = array.array("d", bytes(16 * capacity))
        self._count = 0
        self._fd = os.open("/proc/self/status", os.O_RDONLY)

    def _sample(self):
        if 2 * self._count < len(self._rows):
            self._rows[2 * self._count] = time.perf_counter()
            self._rows[2 * self._count + 1] = _rss_anon(os.pread(self._fd, 1 << 14, 0))
            self._count += 1

    def __enter__(self):
        self._sample()
        self.base = int(self._rows[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()
        os.close(self._fd)

    @property
    def samples(self) -> list[tuple[float, int]]:
        return [(self._rows[2 * i], int(self._rows[2 * i + 1])) for i in range(self._count)]


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


def step_overhead(
    model_name: str, frac: float, batch: int, length: int, pairs: int, tmp: Path, accumulate: int = 1
) -> dict:
    """Alternating optimizer steps with/without projection; ratio of median times.

    An optimizer step takes `accumulate` micro-batches of batch×length tokens, and is projected once.
    """
    model, _ = load_model(model_name)
    model.train()
    base = resolve(model_name)
    tuned = perturbed_copy(base, tmp / f"tuned-{model_name}")
    basis = build_basis(CheckpointDelta(str(tuned), base), frac=frac, progress=False)
    # OnlineProjection's per-step work, as the callback runs it after each optimizer step.
    cb = StepProjector(basis, "orthogonal", find_targets(model, basis))
    cb.keep_start(resumed=False, start_dir=None)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, model.config.vocab_size, (batch, length), generator=g)
    inputs = {"input_ids": ids, "labels": ids}

    def step(project: bool) -> float:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        for _ in range(accumulate):
            (model(**inputs).loss / accumulate).backward()
        opt.step()
        if project:
            cb.project_weights()
        return time.perf_counter() - t0

    step(False), step(True)  # warm-up
    plain, projected = alternate(step, pairs)
    proj_only = []
    for _ in range(max(3, pairs)):
        t0 = time.perf_counter()
        cb.project_weights()
        proj_only.append(time.perf_counter() - t0)
    tokens = batch * length * accumulate
    timing = timing_row(plain, projected, proj_only, basis, tokens)
    return {"model": model_name, "frac": frac, "micro_batches_per_step": accumulate, **timing, "target": 1.03}


def alternate(step, pairs: int) -> tuple[list[float], list[float]]:
    """`step(project)` timed `pairs` times each way, the order alternating so drift in machine speed hits
    both alike; (without, with)."""
    plain, projected = [], []
    for i in range(pairs):
        for flag in (False, True) if i % 2 == 0 else (True, False):
            (projected if flag else plain).append(step(flag))
    return plain, projected


def timing_row(plain: list[float], projected: list[float], alone: list[float], basis, tokens: int) -> dict:
    """Median step times without and with projection, the projection alone, and the FLOP floor
    2·min(k, m−k)/(3T) of the projection against the step for `tokens` tokens per optimizer step."""
    entries = basis.entries.values()
    floor = sum(4 * min(e.left.k, e.left.dim - e.left.k) * e.shape[0] * e.shape[1] for e in entries)
    step_flops = sum(6 * e.shape[0] * e.shape[1] * tokens for e in entries)
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return {
        "tokens_per_step": tokens,
        "step_s_without": med(plain),
        "step_s_with": med(projected),
        "ratio": med(projected) / med(plain),
        "projection_s": med(alone),
        "projection_over_step": med(alone) / med(plain),
        "flop_floor": floor / step_flops,
    }


def _build_trace(tuned: str, base: str, frac: float) -> dict:
    """Peak anonymous RSS of a basis build above its start, and its transient above the basis so far.

    The source notes when each tensor is first read: by then every earlier tensor's entry is done,
    so at any sample the basis so far is known, and the transient is the sample less the start
    less that. A tensor's own factors count as transient until the next is read, which errs on the
    high side.
    """
    asked: list[float] = []

    class Noting(CheckpointDelta):
        """Notes when each tensor is first read (the build reads a tensor again when it needs it)."""

        def get(self, name):
            delta = super().get(name)
            if len(asked) < len(self._names) and name == self._names[len(asked)]:
                asked.append(time.perf_counter())
            return delta

    source = Noting(tuned, base)
    shapes = {n: torch.Size(source.shape(n)) for n in source.names()}
    largest = max(4 * s.numel() for s in shapes.values())
    # One-time library workspaces (BLAS/LAPACK buffers grow with the shapes they first meet, thread
    # pools) belong to the process, not the build: warm them up on one matrix of every shape.
    build_basis([(str(s), torch.randn(s)) for s in set(shapes.values())], frac=frac, progress=False)
    with MemoryTrace() as mem:
        basis = build_basis(source, frac=frac, progress=False)
    # What the finished basis holds besides its tensors' bytes (Python objects, small-allocation
    # pages) is spread evenly over its entries and counted as basis, not as transient.
    end = mem.samples[-1][1] - mem.base
    per_entry = max(0, end - basis.nbytes()) / len(basis)
    done = [0]  # done[i]: basis bytes finished before the i-th tensor (0-based) was first read
    for name in basis.names():
        done.append(done[-1] + basis.entries[name].nbytes() + per_entry)
    # At time t the tensor in work is the last one first read by then; the entries before it are done.
    finished = lambda t: done[max(0, bisect.bisect_right(asked, t) - 1)]  # noqa: E731
    transient = max(rss - mem.base - finished(t) for t, rss in mem.samples)
    return {
        "peak_anon_rss_above_start_bytes": max(r for _, r in mem.samples) - mem.base,
        "transient_bytes": max(0, int(transient)),
        "basis_bytes": basis.nbytes(),
        "basis_resident_bytes": end,
        "largest_pair_bytes": 2 * largest,
        "projected_weights_bytes": 4 * sum(s.numel() for s in shapes.values()),
    }


def in_fresh_process(fn, *args):
    """fn(*args) in a fresh process: in this one, memory that earlier phases freed is reused by the
    allocator and would hide the measured work's own peak."""
    # glibc serves every allocation above 64 KiB by mmap and unmaps it on free, so the RSS follows live
    # memory instead of the heap's high-water mark (its default threshold adapts upwards at run time).
    previous = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    try:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            return pool.apply(fn, args)
    finally:
        if previous is None:
            os.environ.pop("MALLOC_MMAP_THRESHOLD_")
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = previous


def build_memory(model_name: str, frac: float, tmp: Path) -> dict:
    """The build's transient memory, measured in a fresh process."""
    base = resolve(model_name)
    tuned = perturbed_copy(base, tmp / f"tuned-mem-{model_name}")
    trace = in_fresh_process(_build_trace, str(tuned), base, frac)
    return {
        "model": model_name,
        "frac": frac,
        **trace,
        "transient_over_largest_pair": trace["transient_bytes"] / trace["largest_pair_bytes"],
        "target": 1.3,
    }


def _posthoc_trace(model_name: str, reference: str, root: str, fracs: list[float]) -> dict:
    """Peak anonymous RSS of PosthocProjection's train end above the trained model."""
    from types import SimpleNamespace

    from safeproj.callbacks.posthoc_projection import PosthocProjection

    model, _ = load_model(model_name)
    module = SimpleNamespace(model=model, model_name=model_name, base_dir=resolve(model_name))
    trainer = SimpleNamespace(is_global_zero=True, global_rank=0, callbacks=[], loggers=[], default_root_dir=root)
    callback = PosthocProjection(reference, fracs=fracs, out_dir=str(Path(root) / "posthoc"))
    callback.setup(trainer, module, "fit")
    callback.on_train_start(trainer, module)
    targets = callback._targets
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # training: every projected weight moves
        for t in targets:
            t.weight.add_(1e-3 * torch.randn(t.weight.shape, generator=g))
    # One-time library workspaces belong to the process: warm them up on one matrix of every shape.
    build_basis([(str(s), torch.randn(s)) for s in {t.weight.shape for t in targets}], frac=0.5, progress=False)
    start = time.perf_counter()
    with MemoryTrace() as mem:
        callback.on_train_end(trainer, module)
    return {
        "seconds": time.perf_counter() - start,
        "variants": len(callback.rows),
        "peak_above_trained_bytes": max(r for _, r in mem.samples) - mem.base,
        "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "projected_weights_bytes": sum(t.weight.numel() * t.weight.element_size() for t in targets),
    }


def posthoc_memory(model_name: str, fracs: list[float], tmp: Path) -> dict:
    """PosthocProjection's peak memory at train end (every selection at `fracs`), measured in a fresh process."""
    base = resolve(model_name)
    tuned = perturbed_copy(base, tmp / f"tuned-posthoc-{model_name}", scale=1e-2)
    root = str(tmp / f"posthoc-{model_name}")
    trace = in_fresh_process(_posthoc_trace, model_name, f"{tuned},{base}", root, fracs)
    return {
        "model": model_name,
        "fracs": fracs,
        **trace,
        "peak_over_model": trace["peak_above_trained_bytes"] / trace["model_bytes"],
        "target": 1.2,
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


def sharded_traffic(model_name: str, fracs, tmp: Path) -> list[dict]:
    base = resolve(model_name)
    tuned = perturbed_copy(base, tmp / f"tuned-sharded-{model_name}")
    source = CheckpointDelta(str(tuned), base)
    model, _ = load_model(model_name)
    gradient_bytes = 4 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    rows = []
    for frac in fracs:
        for side in ("left", "right"):
            basis = build_basis(source, frac=frac, side=side, progress=False)
            # The all-reduced product is Qᵀ·Δ: stored columns of Q (k, or m − k for a complement) × n.
            payload = sum(4 * e.left.Q.shape[1] * e.shape[1] for e in basis.entries.values() if e.left is not None)
            rows.append(
                {
                    "model": model_name,
                    "frac": frac,
                    "side": side,
                    "projection_allreduce_payload_bytes": payload,
                    "gradient_reduce_scatter_payload_bytes": gradient_bytes,
                    "wire_bytes_over_reduce_scatter": 2 * payload / gradient_bytes,
                    # FSDP2's own step: all-gathers in forward and backward plus the reduce-scatter.
                    "wire_bytes_over_fsdp_step": 2 * payload / (3 * gradient_bytes),
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/projection.json")
    parser.add_argument("--quick", action="store_true", help="tiny model only")
    parser.add_argument("--fracs", type=float, nargs="+", default=[0.01, 0.25, 0.5, 0.99], help="fracs for step timing")
    parser.add_argument(
        "--accumulate",
        type=int,
        default=16,
        help="micro-batches per optimizer step for the large-step rows (16 gives SmolLM2 the paper's 32×512 tokens)",
    )
    parser.add_argument("--accumulate-fracs", type=float, nargs="+", default=[0.5], help="SmolLM2 fracs at that size")
    parser.add_argument("--size-fracs", type=float, nargs="+", default=[0.01, 0.25, 0.5, 0.75, 0.99])
    parser.add_argument(
        "--posthoc-fracs",
        type=float,
        nargs="+",
        default=[0.5],
        help="fracs of the post hoc grid (its peak is per tensor, so one frac measures it; more take longer)",
    )
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
    result = {
        "torch_threads": torch.get_num_threads(),
        "overhead": [],
        "build_memory": [],
        "basis_size": [],
        "posthoc_memory": [],
        "sharded_traffic": [],
    }
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for name in models:
            big = name != "tiny"
            if "overhead" in args.parts:
                length = 256 if big else 128
                runs = [(frac, 1, 3 if big else 10) for frac in args.fracs]
                runs += [
                    (frac, args.accumulate, 2 if big else 10) for frac in (args.accumulate_fracs if big else args.fracs)
                ]
                for frac, accumulate, pairs in runs:
                    row = step_overhead(name, frac, 4, length, pairs, tmp, accumulate=accumulate)
                    result["overhead"].append(row)
                    print(json.dumps(row), flush=True)
            if "memory" in args.parts:
                result["build_memory"].append(build_memory(name, 0.5, tmp))
                print(json.dumps(result["build_memory"][-1]))
            if "size" in args.parts:
                result["basis_size"] += basis_sizes(name, args.size_fracs, tmp)
            if "posthoc" in args.parts:
                result["posthoc_memory"].append(posthoc_memory(name, args.posthoc_fracs, tmp))
                print(json.dumps(result["posthoc_memory"][-1]), flush=True)
            if "sharded" in args.parts:
                result["sharded_traffic"] += sharded_traffic(name, args.size_fracs, tmp)
    # Parts not measured this time keep their rows from the file, so measuring one part erases no other.
    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.is_file() else {}
    for part, key in PART_KEYS.items():
        if part not in args.parts and key in previous:
            result[key] = previous[key]
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
