"""A run stopped and resumed from its last checkpoint sees the batches an uninterrupted run sees, in order,
and ends with the same weights bit for bit (CPU, tiny model, two epochs of six batches)."""

import lightning as L
import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

from helpers.projection import Capture
from safeproj.data import InstructionDataModule, SourceSpec
from safeproj.data.sampler import EpochShuffle
from safeproj.model.module import SafeprojLM

STEPS, EVERY = 10, 4  # 24 examples / batch 4 = 6 batches per epoch: the run crosses an epoch


class StopAt(Callback):
    """Dies before step `step + 1` begins, as a killed process would (no checkpoint on the way out)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("stopped")


def _fit(root, callbacks=(), ckpt_path=None, saved_on="train"):
    """`saved_on="train"`: a checkpoint every EVERY steps; "validation": one after each validation run
    (every EVERY steps), which Lightning saves outside the training step."""
    validation = saved_on == "validation"
    module = SafeprojLM(model="tiny", lr=1e-2, warmup_ratio=0.0)
    data = InstructionDataModule([SourceSpec("builtin:useful")], num_samples=30 if validation else 24,
                                 val_fraction=0.2 if validation else 0.0, batch_size=4, max_length=256, seed=0)  # fmt: skip
    losses = Capture()
    checkpoints = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=None if validation else EVERY,
                                  save_top_k=-1, save_last=True)  # fmt: skip
    trainer = L.Trainer(
        max_steps=STEPS, accelerator="cpu", logger=losses, log_every_n_steps=1, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=root, callbacks=[*callbacks, checkpoints],
        val_check_interval=EVERY if validation else None, limit_val_batches=1 if validation else None,
        num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(module, data, ckpt_path=ckpt_path)
    steps = {step: m["train/loss"] for step, m in losses.logged if "train/loss" in m}
    return {n: p.detach().clone() for n, p in module.named_parameters()}, steps


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    runs = {}

    def run(saved_on):
        if saved_on not in runs:
            runs[saved_on] = _fit(tmp_path_factory.mktemp("whole"), saved_on=saved_on)
        return runs[saved_on]

    return run


@pytest.mark.parametrize(
    ("saved_on", "stop", "resumed_from"),
    # Validation runs after batch 4 of each 6-batch epoch: checkpoints at steps 4 and 10.
    [("train", 8, 8), ("train", 6, 4), ("validation", 4, 4), ("validation", 7, 4)],
    ids=["at-checkpoint", "mid-interval", "at-validation-checkpoint", "mid-interval-after-validation"],
)
def test_resumed_run_equals_uninterrupted_run(tmp_path, uninterrupted, saved_on, stop, resumed_from):
    with pytest.raises(RuntimeError, match="stopped"):
        _fit(tmp_path, [StopAt(stop)], saved_on=saved_on)
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["global_step"] == resumed_from
    weights, losses = _fit(tmp_path, ckpt_path=tmp_path / "ckpt" / "last.ckpt", saved_on=saved_on)
    whole_weights, whole_losses = uninterrupted(saved_on)
    assert sorted(losses) == list(range(resumed_from, STEPS))  # logged at the step count before each step
    assert all(losses[s] == whole_losses[s] for s in losses)
    assert all(torch.equal(weights[n], whole_weights[n]) for n in whole_weights)


def test_epoch_order_is_fixed_by_seed_and_epoch_and_resumes_mid_epoch():
    sampler = EpochShuffle(10, seed=1)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(first) == sorted(second) == list(range(10)) and first != second
    again = EpochShuffle(10, seed=1)
    again.resume(epoch=1, skip=4)
    assert list(again) == first  # another epoch: nothing skipped
    again.set_epoch(1)
    assert list(again) == second[4:] and len(again) == 10


def test_processes_split_each_epoch_as_distributed_sampler_does_and_resume_within_their_share():
    whole = EpochShuffle(10, seed=3).order(0)
    shares = [EpochShuffle(10, seed=3, num_replicas=4, rank=r) for r in range(4)]
    assert [len(s) for s in shares] == [3, 3, 3, 3]  # 10 padded to 12 from the order's start
    padded = whole + whole[:2]
    assert [list(s) for s in shares] == [padded[r::4] for r in range(4)]
    assert isinstance(shares[0], torch.utils.data.DistributedSampler)  # so Lightning keeps it as it is
    # Each process resumes after the batches it trained on; together they see what an uninterrupted run does.
    shares[1].set_epoch(2)
    resumed = EpochShuffle(10, seed=3, num_replicas=4, rank=1)
    resumed.resume(epoch=2, skip=2)
    resumed.set_epoch(2)
    assert list(resumed) == list(shares[1])[2:]
    with pytest.raises(ValueError, match="rank=4, num_replicas=4"):
        EpochShuffle(10, seed=3, num_replicas=4, rank=4)


def test_a_data_parallel_process_resumes_its_own_share_of_the_epoch():
    """The loader a process builds under DDP or FSDP2 draws its share, after the batches it trained on."""
    from types import SimpleNamespace

    from safeproj.model.loading import tiny_model

    tokenizer = tiny_model()[1]
    for rank in (0, 1):
        data = InstructionDataModule([SourceSpec("builtin:useful")], num_samples=24, val_fraction=0.0, batch_size=4,
                                     max_length=256, seed=0, tokenizer=tokenizer)  # fmt: skip
        data.setup("fit")
        data.trainer = SimpleNamespace(world_size=2, global_rank=rank,
                                       distributed_sampler_kwargs={"num_replicas": 2, "rank": rank})  # fmt: skip
        data.load_state_dict({"epoch": 0, "batches": 2})
        sampler = data.train_dataloader().sampler
        whole = EpochShuffle(len(data.train_dataset), seed=0).order(0)
        assert (sampler.num_replicas, sampler.rank, len(sampler)) == (2, rank, 12)
        assert list(sampler) == whole[rank::2][8:]  # its own share, after 2 batches of 4
