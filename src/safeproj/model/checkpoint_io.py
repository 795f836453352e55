"""Lightning checkpoints written atomically on local disks, and read with a one-line error when broken.

Lightning's `TorchCheckpointIO` writes through an fsspec transaction whose temporary file lives in the
system temp folder; moving it onto another file system is a copy, so a disk that fills during that copy
leaves a truncated `.ckpt` where `--ckpt_path last` would pick it. Here the temporary file sits beside the
target and is renamed into place, so a failed write leaves only the previous checkpoints.

Under FSDP2 (`ModelParallelStrategy`) a checkpoint is a folder every process writes its part of, in place,
which no CheckpointIO reaches: `atomic_distributed_saves` has the processes write a folder beside it,
and rank zero swaps it in once all have written.
"""

from __future__ import annotations

import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from typing_extensions import override

from safeproj.io import atomic_file

# What torch.load raises on a truncated or overwritten file.
_BROKEN = (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile)


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` with local writes as temp-file-then-rename and unreadable files named in one line."""

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        protocol = get_filesystem(path).protocol
        if storage_options is not None or "file" not in (protocol if isinstance(protocol, tuple) else (protocol,)):
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_file(path) as tmp:
            torch.save(checkpoint, tmp)

    @override
    def load_checkpoint(self, path: _PATH, *args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            return super().load_checkpoint(path, *args, **kwargs)
        except _BROKEN as err:
            reason = " ".join(str(err).split())[:160]
            raise ValueError(
                f"checkpoint {path} is unreadable, probably truncated ({reason}); resume from an earlier one"
            ) from None


def with_atomic_checkpoints(plugins: Any) -> list[Any]:
    """A Trainer's `plugins` with an `AtomicCheckpointIO` added unless one CheckpointIO is already given."""
    from lightning.fabric.plugins import CheckpointIO

    listed = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if any(isinstance(p, CheckpointIO) for p in listed):
        return listed
    return [*listed, AtomicCheckpointIO()]


def atomic_distributed_saves(strategy: Any) -> None:
    """Make a ModelParallelStrategy's distributed checkpoints appear whole or not at all (a no-op for other
    strategies). A save killed part-way leaves a hidden `.<name>.partial` folder and the previous checkpoint;
    one killed during the swap leaves `.<name>.old`, never a half-written folder under the checkpoint's name."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    if not isinstance(strategy, ModelParallelStrategy) or not strategy._save_distributed_checkpoint:
        return
    save = strategy.save_checkpoint

    def save_whole(checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        path = Path(strategy.broadcast(str(filepath)))
        partial, old = path.with_name(f".{path.name}.partial"), path.with_name(f".{path.name}.old")
        if strategy.is_global_zero:
            shutil.rmtree(partial, ignore_errors=True)
        strategy.barrier("safeproj-checkpoint-start")
        save(checkpoint, partial, storage_options)
        strategy.barrier("safeproj-checkpoint-written")
        if strategy.is_global_zero:
            shutil.rmtree(old, ignore_errors=True)
            if path.exists():
                path.rename(old)
            partial.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        strategy.barrier("safeproj-checkpoint-swapped")

    strategy.save_checkpoint = save_whole
