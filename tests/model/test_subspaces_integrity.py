"""A corrupt cached basis is rebuilt; a corrupt basis file given by path is refused in one line."""

import pytest
import torch

from helpers.corrupt import flip_bit
from safeproj.core.basis import Basis
from safeproj.core.options import BasisOptions
from safeproj.model.loading import cache_dir, tiny_dir
from safeproj.model.subspaces import basis_file, resolve_basis

NAME = "model.layers.0.self_attn.q_proj.weight"


def test_corrupt_cache_entry_is_rebuilt():
    spec, options = f"{tiny_dir(1)},{tiny_dir(0)}", BasisOptions(frac=0.25, seed=7)
    before = set((cache_dir() / "bases").glob("*.safetensors"))
    first = resolve_basis(spec, options, progress=False).entries[NAME].left.Q.clone()  # safetensors maps the file
    (cached,) = set((cache_dir() / "bases").glob("*.safetensors")) - before
    flip_bit(cached, f"{NAME}::left")
    with pytest.raises(ValueError, match="does not match its digest"):
        Basis.load(cached)
    with pytest.warns(UserWarning, match="rebuilding"):
        again = resolve_basis(spec, options, progress=False)
    assert torch.equal(again.entries[NAME].left.Q, first)
    Basis.load(cached)  # the cache holds a whole basis again


def test_corrupt_basis_file_is_refused(tmp_path):
    path = tmp_path / "basis.safetensors"
    resolve_basis(f"{tiny_dir(1)},{tiny_dir(0)}", BasisOptions(frac=0.25), progress=False).save(path)
    flip_bit(path, f"{NAME}::left")
    with pytest.raises(ValueError, match=rf"^cannot read basis file {path}: tensor {NAME}::left does not match"):
        resolve_basis(str(path), BasisOptions(frac=0.25))


def test_a_resolved_basis_names_the_file_it_was_read_from(tmp_path):
    spec, options = f"{tiny_dir(1)},{tiny_dir(0)}", BasisOptions(frac=0.5, seed=3)
    before = set((cache_dir() / "bases").glob("*.safetensors"))
    built = resolve_basis(spec, options, progress=False)
    (cached,) = set((cache_dir() / "bases").glob("*.safetensors")) - before
    assert basis_file(built) == str(cached.resolve())
    artifact = tmp_path / "copy.safetensors"
    built.save(artifact)
    assert basis_file(resolve_basis(str(artifact), options, progress=False)) == str(artifact.resolve())
