"""Run by test_fsdp.py: SafeprojLM (tiny) + AdamW + OnlineProjection, one process or two FSDP2 processes (gloo).

Rank r writes its full final weights and the logged projection metrics to <out>/rank<r>.pt. Two
processes each see half of every global batch (as in ddp_worker), so both set-ups take the same steps.
"""

import sys

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.tensor import DTensor

from helpers.ddp_worker import Halves
from helpers.projection import Capture
from safeproj.callbacks.online_projection import OnlineProjection
from safeproj.model.module import LoraSettings, SafeprojLM

STEPS = 4


class Block(torch.utils.data.Sampler):
    """Rank r takes the contiguous block [r*STEPS, (r+1)*STEPS) of Halves' rank-major layout."""

    def __iter__(self):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        return iter(range(rank * STEPS, (rank + 1) * STEPS))

    def __len__(self):
        return STEPS


def tiny_module(weights: str = "full", rank: int = 4) -> SafeprojLM:
    """The tiny model, whole or with LoRA adapters on q, o and down; as for weights with no plain local copy,
    the run saves its start to initial/ (which W₀ is read from)."""
    adapters = LoraSettings(r=rank, alpha=8, dropout=0.0, target_modules=["q_proj", "o_proj", "down_proj"])
    module = SafeprojLM("tiny", lr=1e-2, warmup_ratio=0.0, lora=adapters if weights == "lora" else None)
    module.base_dir = None
    return module


def halves(devices: int) -> torch.utils.data.DataLoader:
    """STEPS global batches, each rank taking its half (one process takes both halves at once)."""
    return torch.utils.data.DataLoader(Halves(STEPS, devices), batch_size=None, sampler=Block())


def fsdp_trainer(devices: int, out, callbacks, logger=False, timeout=None, **settings) -> L.Trainer:
    """STEPS steps on the CPU: one process, or `devices` FSDP2 processes (ModelParallelStrategy, gloo, with
    `timeout` for collectives where given)."""
    strategy = "auto"
    if devices > 1:
        strategy = ModelParallelStrategy(
            data_parallel_size=devices,
            tensor_parallel_size=1,
            process_group_backend="gloo",
            **({} if timeout is None else {"timeout": timeout}),
        )
    return L.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        use_distributed_sampler=False,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
        callbacks=callbacks,
        **settings,
    )


def main(out, devices, basis, on, lora="full"):
    devices = int(devices)
    L.seed_everything(0)
    module = tiny_module(lora)
    data = halves(devices)
    logger = Capture()
    callbacks = [OnlineProjection(basis, keep="orthogonal", on=on, log_every_n_steps=2)]
    trainer = fsdp_trainer(devices, out, callbacks, logger=logger, gradient_clip_val=1.0)
    trainer.fit(module, data)
    sharded = any(isinstance(p, DTensor) for p in module.model.parameters())
    weights = {
        n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for n, p in module.model.named_parameters()
    }
    metrics = [(step, m) for step, m in logger.logged if any(k.startswith("projection/") for k in m)]
    torch.save({"weights": weights, "metrics": metrics, "sharded": sharded}, f"{out}/rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
