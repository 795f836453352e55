"""Run by test_ddp.py: AdamW + OnlineProjection on the tiny model, one or two CPU processes (gloo).

Each rank writes its final weights to <out>/rank<r>.safetensors. With two ranks each sees half of every
global batch, so both set-ups see the same data per optimizer step.
"""

import sys

import lightning as L
import torch
from safetensors.torch import save_file

from helpers.projection import TinyLM, batch
from safeproj.callbacks.online_projection import OnlineProjection


class Halves(torch.utils.data.Dataset):
    def __init__(self, steps, world):
        full = [batch(seed=i, size=4) for i in range(steps)]
        per = 4 // world
        # Sample j of step i goes to rank j // per, as DistributedSampler does with shuffle off when
        # the dataset is laid out rank-major below.
        self.items = []
        for r in range(world):
            for b in full:
                self.items.append({k: v[r * per : (r + 1) * per] for k, v in b.items()})
        self.world, self.steps = world, steps

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def main(out, devices, basis):
    devices = int(devices)
    steps = 4
    L.seed_everything(0)
    module = TinyLM(optimizer="adamw", lr=1e-2)
    data = Halves(steps, devices)
    sampler = None
    if devices > 1:
        # Rank r takes the contiguous block [r*steps, (r+1)*steps).
        class Block(torch.utils.data.Sampler):
            def __iter__(self):
                rank = torch.distributed.get_rank()
                return iter(range(rank * steps, (rank + 1) * steps))

            def __len__(self):
                return steps

        sampler = Block()
    dl = torch.utils.data.DataLoader(data, batch_size=None, sampler=sampler)
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[OnlineProjection(basis, keep="orthogonal", on="update")],
    )
    trainer.fit(module, dl)
    weights = {n: p.detach().contiguous() for n, p in module.model.named_parameters()}
    save_file(weights, f"{out}/rank{trainer.global_rank}.safetensors")


if __name__ == "__main__":
    main(*sys.argv[1:])
