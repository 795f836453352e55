"""Named tensor sets: `@paper` selects every stored tensor (embeddings and 1-D tensors too), and a 1-D tensor's
projection is exact: idempotent, and P·x + P⊥·x = x."""

import pytest
import torch

from safeproj.core.basis import build_basis_with
from safeproj.core.deltas import CheckpointDelta, select_names
from safeproj.core.options import BasisOptions
from safeproj.core.projector import project
from safeproj.model.loading import tiny_model

NAMES = ["model.embed_tokens.weight", "model.layers.0.input_layernorm.weight", "model.layers.0.self_attn.q_proj.weight"]


def test_the_paper_set_adds_embeddings_and_1d_tensors_to_the_default():
    assert select_names(NAMES) == NAMES[2:]
    assert select_names(NAMES, include=["@default"]) == NAMES[2:]
    assert select_names(NAMES, include=["@paper"]) == NAMES
    assert select_names(NAMES, include=["@paper"], exclude=["embed"]) == NAMES[1:]
    with pytest.raises(ValueError, match="unknown tensor set '@all' in include; known: @default, @paper"):
        select_names(NAMES, include=["@all"])


@pytest.fixture(scope="module")
def paper_delta(tmp_path_factory):
    """Δ of the tiny model and a copy with every tensor moved (norms start equal to 1 in any seed)."""
    folders = []
    generator = torch.Generator().manual_seed(1)
    for moved in (False, True):
        model = tiny_model()[0]
        with torch.no_grad():
            for weight in model.parameters() if moved else ():
                weight.add_(0.01 * torch.randn(weight.shape, generator=generator))
        folder = tmp_path_factory.mktemp("tuned" if moved else "base")
        model.save_pretrained(folder, safe_serialization=True)
        folders.append(folder)
    return CheckpointDelta(folders[1], folders[0], include=["@paper"])


def test_a_paper_delta_covers_every_stored_tensor(paper_delta):
    stored = set(tiny_model()[0].state_dict())
    assert set(paper_delta.names()) == stored
    assert "model.embed_tokens.weight" in stored and "model.norm.weight" in stored


def test_a_1d_tensors_projection_is_exact(paper_delta):
    names = ["model.norm.weight", "model.layers.1.post_attention_layernorm.weight"]
    source = CheckpointDelta(paper_delta.tuned.path, paper_delta.base.path, include=[f"^{n}$" for n in names])
    basis = build_basis_with(source, BasisOptions(frac=0.5, include=["@paper"]), progress=False)
    x = torch.randn(64, generator=torch.Generator().manual_seed(0))
    for name in names:
        entry = basis[name]
        parallel, orthogonal = project(x, entry, "parallel"), project(x, entry, "orthogonal")
        assert torch.allclose(project(parallel, entry, "parallel"), parallel, atol=1e-6)  # P² = P
        assert torch.allclose(parallel + orthogonal, x, atol=1e-6)  # P + P⊥ = I
        direction = source.get(name) / source.get(name).norm()  # the span of an m×1 column is its vector
        assert torch.allclose(parallel, (direction @ x) * direction, atol=1e-5)
