"""What callbacks that work on FSDP2's row shards share: whether a strategy shards the weights, which targets
are sharded, and refusing FSDP (v1), whose flat parameters have no rows to work on."""

from __future__ import annotations

from lightning.pytorch import Trainer
from lightning.pytorch.strategies import ModelParallelStrategy

from safeproj.core.sharded import is_sharded
from safeproj.core.targets import Target


def shards_weights(trainer: Trainer) -> bool:
    """Whether the strategy shards the weights over processes: FSDP2 (ModelParallelStrategy) or FSDP."""
    strategy = trainer.strategy
    return isinstance(strategy, ModelParallelStrategy) or "FSDP" in type(strategy).__name__


def target_is_sharded(t: Target) -> bool:
    """Whether a weight, or either factor of a LoRA pair, is a DTensor (FSDP2)."""
    return any(is_sharded(p) for p in ((t.lora_b, t.lora_a) if t.is_lora else (t.weight,)))


def refuse_flat_parameters(owner: str, trainer: Trainer) -> None:
    """ValueError naming `owner` under FSDP (v1): it works on FSDP2's row shards."""
    if shards_weights(trainer) and not isinstance(trainer.strategy, ModelParallelStrategy):
        raise ValueError(
            f"{owner} does not support FSDP ({type(trainer.strategy).__name__}): it works on FSDP2's row shards; "
            "use ModelParallelStrategy"
        )
