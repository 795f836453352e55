"""A Hugging Face hub cache written by the tests: models saved under hub names, offline."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest


def repo_folder(cache: Path, repo: str) -> Path:
    """`<cache>/models--org--name`, as huggingface_hub names a model repository's folder."""
    return cache / f"models--{repo.replace('/', '--')}"


def cache_model(
    cache: Path,
    repo: str,
    model,
    tokenizer,
    revision: str = "main",
    commit: str | None = None,
    max_shard_size: str | None = None,
) -> Path:
    """Save `model` and `tokenizer` as snapshot `commit` of `repo`, with `refs/<revision>` naming it.

    The layout is huggingface_hub's: file contents under `blobs/<sha256>`, the snapshot folder of relative
    symlinks to them. `max_shard_size` (e.g. "100KB") writes sharded weights with an index.
    """
    commit = commit or hashlib.sha1(f"{repo}@{revision}".encode()).hexdigest()
    folder = repo_folder(cache, repo)
    snapshot = folder / "snapshots" / commit
    extra = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(snapshot, safe_serialization=True, **extra)
    tokenizer.save_pretrained(snapshot)
    blobs = folder / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    for file in sorted(p for p in snapshot.iterdir() if p.is_file() and not p.is_symlink()):
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        file.replace(blobs / digest)
        file.symlink_to(os.path.relpath(blobs / digest, snapshot))
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / revision).write_text(commit)
    return snapshot


@contextlib.contextmanager
def offline_hub_cache(cache: Path) -> Iterator[Path]:
    """Make `cache` the Hugging Face hub cache in force, offline, for the duration of the block."""
    from huggingface_hub import constants

    cache.mkdir(parents=True, exist_ok=True)
    with pytest.MonkeyPatch.context() as patch:
        # huggingface_hub reads HF_HUB_CACHE once, at import: the constant it consults is set as well.
        patch.setenv("HF_HUB_CACHE", str(cache))
        patch.setattr(constants, "HF_HUB_CACHE", str(cache))
        patch.setattr(constants, "HF_HUB_OFFLINE", True)
        yield cache
