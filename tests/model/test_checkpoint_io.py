"""Checkpoints are written atomically (a failed write leaves the previous files alone and no partial one)
and a truncated checkpoint is refused in one line naming it; CLI trainers use this CheckpointIO."""

import errno
from pathlib import Path

import pytest
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from safeproj.commands.fit import SafeprojCLI
from safeproj.model.checkpoint_io import AtomicCheckpointIO, atomic_distributed_saves, with_atomic_checkpoints

ROOT = Path(__file__).resolve().parents[2]


def _disk_full_after(nbytes):
    real_save = torch.save

    def save(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        with open(path, "r+b") as handle:  # the write got this far, then the disk filled
            handle.truncate(nbytes)
        raise OSError(errno.ENOSPC, "No space left on device")

    return save


def test_a_write_that_fails_leaves_no_checkpoint_and_keeps_the_last_one(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    last = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(64)}, last)
    monkeypatch.setattr(torch, "save", _disk_full_after(100))
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"step": 2, "w": torch.zeros(64)}, last)
    with pytest.raises(OSError):
        io.save_checkpoint({"step": 2}, tmp_path / "epoch=0-step=2.ckpt")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no partial or temporary file
    assert io.load_checkpoint(last)["step"] == 1


def test_a_truncated_checkpoint_is_one_line_naming_it(tmp_path):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"w": torch.ones(1000)}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ValueError, match=r"checkpoint .*last\.ckpt is unreadable, probably truncated") as info:
        AtomicCheckpointIO().load_checkpoint(path)
    assert "\n" not in str(info.value)


def test_given_checkpoint_io_is_kept():
    mine = AtomicCheckpointIO()
    assert with_atomic_checkpoints([mine]) == [mine]
    assert [type(p) for p in with_atomic_checkpoints(None)] == [AtomicCheckpointIO]


def test_cli_trainers_write_checkpoints_atomically(tmp_path):
    cli = SafeprojCLI(
        run=False,
        args=["--config", str(ROOT / "recipes" / "useful.yaml"), "--model.model", "tiny",
              "--trainer.default_root_dir", str(tmp_path)],
    )  # fmt: skip
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)


class _OneProcess(ModelParallelStrategy):
    """A ModelParallelStrategy whose collectives are those of one process, to test the swap without a group."""

    def broadcast(self, obj, src=0):
        return obj

    def barrier(self, name=None):
        pass


def _writer(fail_after: int | None = None):
    """A distributed save: one file per part into the folder, failing after `fail_after` parts if asked."""

    def save(checkpoint, filepath, storage_options=None):
        folder = Path(filepath)
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(3):
            if fail_after is not None and i == fail_after:
                raise OSError("No space left on device")
            (folder / f"part{i}.distcp").write_text(str(checkpoint["step"]))
        (folder / "meta.pt").write_text(str(checkpoint["step"]))

    return save


def test_a_distributed_checkpoint_appears_whole_or_not_at_all(tmp_path):
    strategy = _OneProcess()
    strategy.save_checkpoint = _writer()
    atomic_distributed_saves(strategy)
    last = tmp_path / "last.ckpt"
    strategy.save_checkpoint({"step": 2}, last)
    assert (last / "meta.pt").read_text() == "2" and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    strategy.save_checkpoint({"step": 4}, last)  # replaces the folder whole
    assert {p.read_text() for p in last.iterdir()} == {"4"}

    torn = _OneProcess()
    torn.save_checkpoint = _writer(fail_after=1)
    atomic_distributed_saves(torn)
    with pytest.raises(OSError, match="No space"):
        torn.save_checkpoint({"step": 6}, last)
    # The previous checkpoint stands; the torn one is hidden, under a name `--ckpt_path last` never picks.
    assert {p.read_text() for p in last.iterdir()} == {"4"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".last.ckpt.partial", "last.ckpt"]
    torn.save_checkpoint = _writer()
    atomic_distributed_saves(torn)
    torn.save_checkpoint({"step": 8}, last)  # the next save clears what the torn one left
    assert {p.read_text() for p in last.iterdir()} == {"8"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_other_strategies_are_left_alone():
    from lightning.pytorch.strategies import DDPStrategy

    strategy = DDPStrategy()
    save = strategy.save_checkpoint
    atomic_distributed_saves(strategy)
    assert strategy.save_checkpoint == save
