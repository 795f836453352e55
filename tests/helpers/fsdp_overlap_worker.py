"""Run by test_fsdp_overlap_safelora.py: SafeprojLM (tiny) + AdamW with OverlapCallback (left and right side) and
SafeLoRA (SafeLoRA's C and the orthonormal variant), one process or two FSDP2 processes (gloo).

Full weights, or LoRA adapters (`weights="lora"`). Rank r writes to <out>/rank<r>.pt both overlap tables,
both SafeLoRA callbacks' similarities and selections, the final weights (gathered after the fit) and how
often each callback ran. Both run with every gather patched to raise there, but for LoRA's small factor A
(r rows), which every row of s·B·A needs whole.
"""

import sys
from contextlib import contextmanager
from unittest import mock

import lightning as L
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from helpers.fsdp_worker import fsdp_trainer, halves, tiny_module
from helpers.projection import Capture
from helpers.sharded_worker import GATHERS
from safeproj.callbacks.overlap import OverlapCallback
from safeproj.callbacks.safelora import SafeLoRA

RANK = 4  # LoRA rank


@contextmanager
def no_weight_gather(calls: list):
    """Every gather raises, but a DTensor's full_tensor of at most RANK rows (LoRA's A)."""
    whole, redistribute = DTensor.full_tensor, DTensor.redistribute

    def refuse(*args, **kwargs):
        raise AssertionError("a weight was gathered")

    def small_only(self, *args, **kwargs):
        if self.shape[0] > RANK:
            refuse()
        with mock.patch.object(DTensor, "redistribute", redistribute):
            return whole(self, *args, **kwargs)

    calls.append(1)
    with (
        mock.patch.multiple(dist, **{name: refuse for name in GATHERS if hasattr(dist, name)}),
        mock.patch.object(DTensor, "full_tensor", small_only),
        mock.patch.object(DTensor, "redistribute", refuse),
    ):
        yield


def without_gathers(method, calls: list):
    def run(*args, **kwargs):
        with no_weight_gather(calls):
            return method(*args, **kwargs)

    return run


def main(out, devices, spec, weights="full"):
    devices = int(devices)
    L.seed_everything(0)
    module = tiny_module(weights, rank=RANK)
    data = halves(devices)
    etas = [0.3, 0.6, 0.9]
    overlaps = [
        OverlapCallback({"ref": spec}, etas=etas, side=side, out_dir=f"{out}/overlap-{side}")
        for side in ("left", "right")
    ]
    # Overlap first: it measures the trained update, before SafeLoRA rewrites it.
    safeloras = [
        SafeLoRA(spec, num_layers=3, variant="safelora"),
        SafeLoRA(spec, threshold=0.75, variant="orthonormal", eta=0.9),
    ]
    measured, rewritten = [], []
    trainer = fsdp_trainer(devices, out, [*overlaps, *safeloras], logger=Capture())
    with (
        mock.patch.object(OverlapCallback, "on_train_end", without_gathers(OverlapCallback.on_train_end, measured)),
        mock.patch.object(SafeLoRA, "apply", without_gathers(SafeLoRA.apply, rewritten)),
    ):
        trainer.fit(module, data)
    weights = {
        n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for n, p in module.model.named_parameters()
    }
    result = {
        "sharded": any(isinstance(p, DTensor) for p in module.model.parameters()),
        "overlap": [cb.tables for cb in overlaps],
        "similarities": [cb.similarities for cb in safeloras],
        "selected": [cb.selected for cb in safeloras],
        "weights": weights,
        "measured": len(measured),
        "rewritten": len(rewritten),
    }
    torch.save(result, f"{out}/rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
