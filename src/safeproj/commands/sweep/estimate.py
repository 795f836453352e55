"""GPU-hour estimates of a sweep's runs from their settings: training tokens and generated tokens, priced at
an assumed throughput per GPU class. Arithmetic only; `plan.py` reads the settings from each cell's config.

Every figure here is an assumption, not a measurement:
- training: tokens/s of a 1B-parameter model on one GPU, scaled as 1/parameters. Derived as
  peak dense bf16 FLOP/s × 35 % utilisation / (8 FLOPs per parameter per token: forward 2, backward 4,
  recomputed forward 2 under gradient checkpointing);
- generation (greedy, batched): each decode step of a batch costs a fixed 25 ms (Hugging Face `generate`'s
  per-step work in Python and small kernels) plus one read of the bf16 weights at 70 % of the memory
  bandwidth; a batch runs `max_new_tokens` steps (an upper bound: it stops early only when every sequence
  in it has ended). Prompt encoding (prefill) is not counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

FLOPS_PER_PARAMETER_TOKEN = 8  # forward 2 + backward 4 + recomputed forward 2 (gradient checkpointing)
TRAIN_UTILISATION = 0.35
DECODE_STEP_OVERHEAD_S = 0.025
BANDWIDTH_UTILISATION = 0.7
BYTES_PER_PARAMETER = 2  # bf16 weights


@dataclass(frozen=True)
class GpuClass:
    """One GPU: its peak dense bf16 FLOP/s and memory bandwidth in bytes/s (vendor figures)."""

    name: str
    peak_bf16_flops: float
    memory_bandwidth: float

    @property
    def train_tokens_per_s_per_billion(self) -> float:
        """Training tokens/s of a 1B-parameter model (a model of N billion parameters: this / N)."""
        return self.peak_bf16_flops * TRAIN_UTILISATION / (FLOPS_PER_PARAMETER_TOKEN * 1e9)


GPUS = {
    gpu.name: gpu
    for gpu in (
        GpuClass("a100-40gb", 312e12, 1.555e12),
        GpuClass("a100-80gb", 312e12, 2.039e12),
        GpuClass("h100-80gb", 989e12, 3.35e12),
        GpuClass("h200", 989e12, 4.8e12),
    )
}


def gpu_class(name: str) -> GpuClass:
    if name not in GPUS:
        raise ValueError(f"unknown GPU class {name!r}; known: {', '.join(GPUS)}")
    return GPUS[name]


@dataclass(frozen=True)
class Training:
    """What one run trains on: examples per epoch, epochs, a step cap, the effective batch and max tokens."""

    examples: int
    epochs: int
    max_steps: int  # -1: no cap
    effective_batch: int
    max_length: int

    @property
    def steps(self) -> int:
        """Optimizer steps (a last partial batch counts as a step)."""
        by_epochs = self.epochs * math.ceil(self.examples / self.effective_batch)
        return by_epochs if self.max_steps < 0 else min(self.max_steps, by_epochs)

    @property
    def tokens(self) -> int:
        """Training tokens, an upper bound: every example padded or cut to `max_length`."""
        return min(self.steps * self.effective_batch, self.epochs * self.examples) * self.max_length


@dataclass(frozen=True)
class Generation:
    """One evaluation pass: items generated in batches of `batch_size`, up to `max_new_tokens` each."""

    items: int
    batch_size: int
    max_new_tokens: int

    @property
    def decode_steps(self) -> int:
        return math.ceil(self.items / self.batch_size) * self.max_new_tokens

    @property
    def tokens(self) -> int:
        return self.items * self.max_new_tokens


def training_seconds(training: Training, parameters_b: float, gpu: GpuClass) -> float:
    """GPU-seconds to train (on several GPUs the same GPU-seconds spread over them)."""
    return training.tokens * parameters_b / gpu.train_tokens_per_s_per_billion


def decode_step_seconds(parameters_b: float, gpu: GpuClass) -> float:
    weights = parameters_b * 1e9 * BYTES_PER_PARAMETER
    return DECODE_STEP_OVERHEAD_S + weights / (gpu.memory_bandwidth * BANDWIDTH_UTILISATION)


def generation_seconds(passes: list[Generation], parameters_b: float, gpu: GpuClass) -> float:
    """GPU-seconds of the evaluation passes' greedy generation (an upper bound, see the module doc)."""
    return sum(p.decode_steps for p in passes) * decode_step_seconds(parameters_b, gpu)
