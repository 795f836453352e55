"""Run by test_fsdp_checkpoint.py: SafeprojLM (tiny) + AdamW + OnlineProjection (update mode) over two FSDP2
processes (gloo), four steps.

Phases: `whole` runs the four steps; `killed` saves Lightning's checkpoint after step 2 and ends every
process abruptly (exit code 17) before step 3; `resumed` continues from `last` (`--ckpt_path last`) in the
same folder, its sampler skipping the batches trained on (as the project's EpochShuffle does). Safetensors files are capped at 64 KiB, so the Hugging Face
checkpoints come in several files with an index. While a checkpoint is saved every `full_tensor` is
tracked (bytes alive at once) and a whole-state-dict gather raises. Rank r writes its gathered final
weights and what it tracked to <out>/rank<r>.pt.
"""

import os
import sys
import weakref

import lightning as L
import torch
import torch.distributed.checkpoint.state_dict as dcp_state_dict
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.tensor import DTensor

from helpers.ddp_worker import Halves
from safeproj.callbacks.online_projection import OnlineProjection
from safeproj.model import hf_checkpoint
from safeproj.model import module as module_file
from safeproj.model.checkpoint_io import atomic_distributed_saves, with_atomic_checkpoints
from safeproj.model.module import SafeprojLM

STEPS = 4
KILL_AT = 2
KILLED = 17


class Block(torch.utils.data.Sampler):
    """Rank r takes its contiguous block of Halves' rank-major layout, less the first `skip` batches."""

    def __init__(self, skip: int = 0):
        self.skip = skip

    def __iter__(self):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        return iter(range(rank * STEPS + self.skip, (rank + 1) * STEPS))

    def __len__(self):
        return STEPS  # the whole epoch: Lightning counts the batches already done from its checkpoint


class Kill(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == KILL_AT:
            trainer.strategy.barrier()  # both processes have finished writing the checkpoint of step 2
            os._exit(KILLED)


class GatherTracker:
    """Bytes of whole tensors alive at once, counted only while a Hugging Face checkpoint is saved."""

    def __init__(self):
        self.saving = False
        self.alive = self.peak = self.calls = 0
        self.largest_entry = 0

    def install(self):
        full_tensor = DTensor.full_tensor
        tracker = self

        def tracked(self, *args, **kwargs):
            out = full_tensor(self, *args, **kwargs)
            if tracker.saving:
                tracker.count(out)
            return out

        DTensor.full_tensor = tracked
        save = module_file.save_gathered_checkpoint

        def saving(model, *args, **kwargs):
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            self.largest_entry = max(self.largest_entry, *(e.nbytes for e in hf_checkpoint.hf_entries(base)))
            self.saving = True
            try:
                return save(model, *args, **kwargs)
            finally:
                self.saving = False

        module_file.save_gathered_checkpoint = saving
        get_model_state_dict = dcp_state_dict.get_model_state_dict

        def no_whole_gather(model, *args, options=None, **kwargs):
            if self.saving:
                raise AssertionError("the whole state dict was gathered while saving")
            return get_model_state_dict(model, *args, options=options, **kwargs)

        dcp_state_dict.get_model_state_dict = no_whole_gather

    def count(self, tensor):
        size = tensor.numel() * tensor.element_size()
        self.calls += 1
        self.alive += size
        self.peak = max(self.peak, self.alive)
        weakref.finalize(tensor, self.release, size)

    def release(self, size):
        self.alive -= size


def main(out, phase):
    hf_checkpoint.MAX_SHARD_BYTES = 64 * 2**10
    tracker = GatherTracker()
    tracker.install()
    L.seed_everything(0)
    module = SafeprojLM("tiny", lr=1e-2, warmup_ratio=0.0)
    module.base_dir = None  # as for weights with no plain local copy: the run saves its start to initial/
    sampler = Block(skip=KILL_AT if phase == "resumed" else 0)
    data = torch.utils.data.DataLoader(Halves(STEPS, 2), batch_size=None, sampler=sampler)
    callbacks = [OnlineProjection(f"{out}/../b.safetensors", keep="orthogonal", on="update", log_every_n_steps=0)]
    if phase != "whole":
        callbacks.append(ModelCheckpoint(dirpath=f"{out}/ckpts", every_n_train_steps=KILL_AT, save_last=True))
    if phase == "killed":
        callbacks.append(Kill())
    trainer = L.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, process_group_backend="gloo"),
        plugins=with_atomic_checkpoints(None),  # as the command line adds it
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=phase != "whole",
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
        default_root_dir=out,
        callbacks=callbacks,
    )
    atomic_distributed_saves(trainer.strategy)  # as the command line does
    trainer.fit(module, data, ckpt_path="last" if phase == "resumed" else None)
    tracker.saving = False
    weights = {n: p.full_tensor().detach().clone() for n, p in module.model.named_parameters()}
    result = {"weights": weights, "peak": tracker.peak, "calls": tracker.calls, "largest": tracker.largest_entry}
    torch.save(result, f"{out}/rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
