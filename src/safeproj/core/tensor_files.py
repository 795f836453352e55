"""Tensors by name from safetensors files: one file, a Hugging Face directory, or a sharded one.

Every reader of checkpoints on disk (deltas between checkpoints, a run's start) goes through
`SafetensorsFiles`, so shard indexes, tied names and unreadable files are handled once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from safetensors import safe_open
from torch import Tensor

# A tied output head is often saved only once, under the embedding's name.
TIED_ALIASES = {
    "lm_head.weight": ("model.embed_tokens.weight", "transformer.wte.weight", "model.decoder.embed_tokens.weight"),
}
_HASH_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """Content hash of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class SafetensorsFiles:
    """Tensor name → file for a safetensors file, an HF directory, or a sharded HF directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        p = self.path
        self.index: Path | None = None
        if p.is_file() and p.suffix == ".safetensors":
            files = {p: None}
        elif (p / "model.safetensors.index.json").is_file():
            self.index = p / "model.safetensors.index.json"
            try:
                weight_map = json.loads(self.index.read_text())["weight_map"]
            except (ValueError, KeyError) as err:
                raise ValueError(f"unreadable shard index {self.index}: {err}") from None
            files = {p / f: None for f in dict.fromkeys(weight_map.values())}
        elif (p / "model.safetensors").is_file():
            files = {p / "model.safetensors": None}
        elif p.is_dir() and any(p.glob("*.bin")):
            raise ValueError(
                f"{p} holds pickled weights only; safeproj reads safetensors (re-save with safe_serialization)"
            )
        else:
            raise ValueError(f"{p} is neither a .safetensors file nor a directory with model.safetensors(.index.json)")
        self.file_of: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for file in files:
            try:
                with safe_open(str(file), framework="pt", device="cpu") as f:
                    for key in f.keys():
                        self.file_of[key] = file
                        self.shapes[key] = tuple(f.get_slice(key).get_shape())
            except FileNotFoundError:
                raise ValueError(f"shard {file} listed in {self.index} is missing") from None
            except Exception as err:
                raise ValueError(f"cannot read safetensors file {file}: {err}") from None

    def resolve(self, name: str) -> str | None:
        """The stored name holding `name` (itself, or a tied alias), or None."""
        if name in self.file_of:
            return name
        return next((a for a in TIED_ALIASES.get(name, ()) if a in self.file_of), None)

    def read(self, stored: str) -> Tensor:
        with safe_open(str(self.file_of[stored]), framework="pt", device="cpu") as f:
            return f.get_tensor(stored)

    def files(self, stored_names: Iterable[str]) -> list[Path]:
        used = dict.fromkeys(self.file_of[n] for n in stored_names)
        return ([self.index] if self.index else []) + list(used)
