"""Lightning checkpoints written atomically on local disks, and read with a one-line error when broken.

Lightning's `TorchCheckpointIO` writes through an fsspec transaction whose temporary file lives in the
system temp folder; moving it onto another file system is a copy, so a disk that fills during that copy
leaves a truncated `.ckpt` where `--ckpt_path last` would pick it. Here the temporary file sits beside the
target and is renamed into place, so a failed write leaves only the previous checkpoints.
"""

from __future__ import annotations

import pickle
import zipfile
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
