"""Run by test_fsdp_posthoc.py: SafeprojLM (tiny) + AdamW with PosthocProjection (parallel and orthogonal),
SubspaceDrift and generating and likelihood evaluators, one process or two FSDP2 processes (gloo).

Full weights, or LoRA adapters (`weights="lora"`). Rank r writes to <out>/rank<r>.pt the posthoc rows, the drift history, the last generated rows, the final
weights (gathered) and how often the variants were written and drift measured. With full weights both run
with every gather patched to raise there, so a projection or measurement that gathered a weight fails.
"""

import sys
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import lightning as L
import torch
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from helpers.fsdp_worker import fsdp_trainer, halves, tiny_module
from helpers.projection import Capture
from helpers.sharded_worker import no_gather
from safeproj.callbacks.drift import SubspaceDrift
from safeproj.callbacks.harm_eval import HarmEval
from safeproj.callbacks.posthoc_projection import PosthocProjection
from safeproj.callbacks.utility_eval import UtilityEval
from safeproj.callbacks.utility_likelihood import UtilityLikelihoodEval
from safeproj.core.variants import WeightVariants


def without_gathers(method, calls: list, refuse: bool = True):
    """`method` run with every gather refused, counting its calls."""

    def run(*args, **kwargs):
        calls.append(1)
        with no_gather() if refuse else nullcontext():
            return method(*args, **kwargs)

    return run


def main(out, devices, spec, basis, weights="full"):
    devices = int(devices)
    L.seed_everything(0)
    module = tiny_module(weights)
    data = halves(devices)
    # Odd item counts: the ranks' shares differ in size (and in batches, with batch_size 1).
    utility = UtilityEval(num_samples=3, max_new_tokens=6, batch_size=2, at_train_end=False, n_boot=20)
    harm = HarmEval(num_samples=3, max_new_tokens=6, batch_size=2, at_train_end=False, n_boot=20)
    likelihood = UtilityLikelihoodEval(num_samples=3, batch_size=1, at_train_end=False, n_boot=20)
    grid = {"fracs": [0.5], "selections": ["top"]}
    posthoc = [
        PosthocProjection(spec, keep=keep, out_dir=f"{out}/{keep}", **grid) for keep in ("parallel", "orthogonal")
    ]
    drift = SubspaceDrift(basis, every_n_steps=1, out_dir=f"{out}/drift")
    projected, measured = [], []
    trainer = fsdp_trainer(devices, out, [*posthoc, drift, utility, harm, likelihood], logger=Capture())
    # A LoRA product's rows need the whole of the small factor A (r×n): gathered, so not refused there.
    refuse = weights == "full"
    with (
        mock.patch.object(WeightVariants, "apply", without_gathers(WeightVariants.apply, projected, refuse)),
        mock.patch.object(SubspaceDrift, "measure", without_gathers(SubspaceDrift.measure, measured, refuse)),
    ):
        trainer.fit(module, data)
    sharded = any(isinstance(p, DTensor) for p in module.model.parameters())
    weights = {
        n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for n, p in module.model.named_parameters()
    }
    result = {
        "sharded": sharded,
        "posthoc": [cb.rows for cb in posthoc],
        "drift": drift.history,
        "harm_rows": harm.last_rows,
        "utility_rows": utility.last_rows,
        "likelihood_rows": likelihood.last_rows,
        "weights": weights,
        "projected": len(projected),
        "measured": len(measured),
    }
    torch.save(result, f"{out}/rank{trainer.global_rank}.pt")


def reference(folder, seed: int = 7) -> str:
    """A `TUNED,BASE` spec of two tiny checkpoints: the tiny model and it plus random noise."""
    from safeproj.model.loading import load_model

    model, _ = load_model("tiny")
    base = {n: p.detach().clone().contiguous() for n, p in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    tuned = {n: w + 0.1 * torch.randn(w.shape, generator=g) for n, w in base.items()}
    for name, tensors in (("base", base), ("tuned", tuned)):
        Path(folder, name).mkdir(parents=True)
        save_file(tensors, str(Path(folder, name, "model.safetensors")))
    return f"{Path(folder, 'tuned')},{Path(folder, 'base')}"


if __name__ == "__main__":
    main(*sys.argv[1:])
