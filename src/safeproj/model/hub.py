"""Hugging Face hub checkpoints as local folders: `org/name[@revision]` becomes a snapshot in the hub cache.

Only safetensors weights and the small config and tokenizer files are fetched (`ALLOW_PATTERNS`), so a
repository that also ships pickled or GGUF copies costs one download of the weights. The snapshot is an
ordinary Hugging Face folder (sharded through `model.safetensors.index.json` or not), read tensor by
tensor like any local checkpoint. A cached snapshot is used without asking the hub; with
HF_HUB_OFFLINE=1 an uncached model fails at once with one line naming it and the cache looked in
(HF_HUB_CACHE, or HF_HOME/hub).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json")
# Config, tokenizer (json, sentencepiece .model, BPE merges .txt, tiktoken), chat template; .py for models
# that need trust_remote_code (their code is only run when that is set).
ALLOW_PATTERNS = (*WEIGHT_PATTERNS, "*.json", "*.model", "*.txt", "*.tiktoken", "*.jinja", "*.py")
_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


class HubModelMissing(ValueError):
    """A hub model that is not in the local cache and may not be downloaded now."""


def is_hub_name(name: str) -> bool:
    """`org/name` or `org/name@revision` that is not an existing local path."""
    return isinstance(name, str) and bool(_NAME.match(name)) and not Path(name).expanduser().exists()


def split_name(name: str) -> tuple[str, str | None]:
    """(repo id, revision or None) of `org/name[@revision]`."""
    repo, _, revision = name.partition("@")
    return repo, revision or None


def cache_location() -> str:
    """The hub cache folder in force (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def is_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def has_weights(folder: Path) -> bool:
    """Whether `folder` holds config.json and complete safetensors weights (every shard of an index)."""
    if not (folder / "config.json").is_file():
        return False
    if (folder / "model.safetensors").is_file():
        return True
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return False
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values())
    except (ValueError, KeyError, TypeError):
        return False
    return bool(shards) and all((folder / shard).is_file() for shard in shards)


def cached_checkpoint(name: str) -> Path | None:
    """The cached snapshot of `org/name[@revision]` with complete weights, or None; never contacts the hub."""
    from huggingface_hub import snapshot_download

    repo, revision = split_name(name)
    try:
        folder = Path(
            snapshot_download(repo, revision=revision, allow_patterns=list(ALLOW_PATTERNS), local_files_only=True)
        )
    except (OSError, ValueError):  # not cached, or cached incompletely (both are OSErrors in huggingface_hub)
        return None
    return folder if has_weights(folder) else None


def checkpoint_dir(name: str, download: bool = True) -> Path:
    """The local snapshot folder of hub model `org/name[@revision]`, fetched first if it is not cached.

    Raises HubModelMissing (a ValueError) when it is not cached and `download` is False or HF_HUB_OFFLINE
    is set, and a one-line ValueError when the hub refuses it or has no safetensors weights for it.
    """
    if not is_hub_name(name):
        raise ValueError(f"{name!r} is not a hub model name 'org/name' or 'org/name@revision'")
    folder = cached_checkpoint(name)
    if folder is not None:
        return folder
    if is_offline() or not download:
        why = "HF_HUB_OFFLINE=1 forbids downloading it" if is_offline() else "it is not downloaded here"
        raise HubModelMissing(
            f"cannot load hub model {name!r}: it is not in the Hugging Face cache {cache_location()} and {why}: point "
            "HF_HUB_CACHE (or HF_HOME) at a cache that holds it, or download it with a network (unset HF_HUB_OFFLINE)"
        )
    folder = _download(name)
    if not has_weights(folder):
        raise ValueError(
            f"hub model {name!r} has no complete safetensors weights with a config.json (safeproj reads safetensors "
            "only): convert it, save it with safe_serialization and pass the folder"
        )
    return folder


def _download(name: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    repo, revision = split_name(name)
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=list(ALLOW_PATTERNS)))
    except GatedRepoError:
        raise ValueError(f"hub model {repo!r} is gated: accept its licence on the hub and set HF_TOKEN") from None
    except RevisionNotFoundError:
        raise ValueError(f"hub model {repo!r} has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise ValueError(f"{name!r} is neither a local path nor a hub model (or it is private: set HF_TOKEN)") from None
    except Exception as err:  # connection, proxy and server errors come in several families
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"cannot download hub model {name!r} ({first}); without a network set HF_HUB_OFFLINE=1 and point "
            f"HF_HUB_CACHE (or HF_HOME) at a cache that holds it (now {cache_location()})"
        ) from None
