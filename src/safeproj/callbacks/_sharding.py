"""Whether a strategy shards the weights, and refusals of callbacks that need them whole."""

from __future__ import annotations

from lightning.pytorch import Trainer
from lightning.pytorch.strategies import ModelParallelStrategy


def shards_weights(trainer: Trainer) -> bool:
    """Whether the strategy shards the weights over processes: FSDP2 (ModelParallelStrategy) or FSDP."""
    strategy = trainer.strategy
    return isinstance(strategy, ModelParallelStrategy) or "FSDP" in type(strategy).__name__


def refuse_sharded_weights(owner: str, trainer: Trainer, why: str) -> None:
    """ValueError naming `owner` and FSDP2 when the strategy shards the weights; `why` says what needs them whole."""
    if shards_weights(trainer):
        raise ValueError(f"{owner} does not support FSDP2 (ModelParallelStrategy) or FSDP: {why}")
