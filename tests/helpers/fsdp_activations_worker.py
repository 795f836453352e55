"""Run by test_fsdp_activations.py: SafeprojLM (tiny) + AdamW with ActivationRecorder, one process or two
FSDP2 processes (gloo).

Rank r records into <out>/acts_rank<r> (so a rank that should write nothing cannot hide behind rank zero's
folder) and writes to <out>/rank<r>.pt whether its weights were sharded, the steps it recorded, and how often
it wrote a recording and how often it only ran the recording forwards.
"""

import sys
from unittest import mock

import lightning as L
import torch
from torch.distributed.tensor import DTensor

from helpers.fsdp_worker import fsdp_trainer, halves, tiny_module
from safeproj.callbacks import activation_recorder
from safeproj.callbacks.activation_recorder import ActivationRecorder

LAYERS = [0, 1]


def counted(function, calls: list):
    def run(*args, **kwargs):
        calls.append(1)
        return function(*args, **kwargs)

    return run


def main(out, devices, weights="full"):
    devices = int(devices)
    L.seed_everything(0)
    module = tiny_module(weights)
    data = halves(devices)
    # 3 prompts per set in batches of 2: the last batch of each set is shorter.
    recorder = ActivationRecorder(
        layers=LAYERS, num_prompts=3, batch_size=2, position="mean", every_n_steps=2, analyse=False
    )
    trainer = fsdp_trainer(devices, out, [recorder])
    recorder.out_dir = f"{out}/acts_rank{trainer.global_rank}"
    written, followed = [], []
    with (
        mock.patch.object(activation_recorder, "record_step", counted(activation_recorder.record_step, written)),
        mock.patch.object(
            activation_recorder,
            "run_recording_forwards",
            counted(activation_recorder.run_recording_forwards, followed),
        ),
    ):
        trainer.fit(module, data)
    result = {
        "sharded": any(isinstance(p, DTensor) for p in module.model.parameters()),
        "recorded_steps": list(recorder.recorded_steps),
        "written": len(written),
        "followed": len(followed),
    }
    torch.save(result, f"{out}/rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
