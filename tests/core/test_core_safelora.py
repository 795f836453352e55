"""SafeLoRA math on bare tensors: C = VVᵀ/‖V‖ versus the orthonormal projector, cosines, layer selection."""

from __future__ import annotations

import math

import pytest
import torch

from safeproj.core.safelora import (
    apply_safelora,
    cosine,
    layer_similarity,
    lora_cosine,
    safelora_projection,
    select_layers,
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def kept(frac: float, shape) -> int:
    """k = round(frac·min(m, n)) with halves rounded up (Python's round() would round them to even)."""
    return max(1, math.floor(frac * min(shape) + 0.5))


def dense_cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double().flatten(), y.double().flatten()
    return float(torch.dot(x, y) / (x.norm() * y.norm()))


def test_safelora_matrix_is_not_idempotent_but_the_orthonormal_variant_is():
    V = torch.randn(12, 8, generator=gen(0)) * torch.linspace(3.0, 0.1, 8)  # uneven spectrum, not orthonormal
    C = safelora_projection(V, "safelora").matrix()
    want = (V.double() @ V.double().T / V.double().norm()).float()
    torch.testing.assert_close(C, want)
    torch.testing.assert_close(C, C.T)
    assert not torch.allclose(C @ C, C, atol=1e-3)  # C² ≠ C: SafeLoRA's C is no projector
    # Its eigenvalues are σᵢ²/‖V‖_F, not 0/1.
    S = torch.linalg.svdvals(V.double())
    eig = torch.linalg.eigvalsh(C.double()).flip(0)[:8]
    torch.testing.assert_close(eig, S**2 / S.norm(), rtol=1e-4, atol=1e-5)

    P = safelora_projection(V, "orthonormal", frac=0.5).matrix()
    torch.testing.assert_close(P @ P, P, atol=1e-5, rtol=1e-5)
    U = torch.linalg.svd(V.double())[0][:, :4]  # k = round(0.5·min(12, 8)) = 4
    torch.testing.assert_close(P.double(), U @ U.T, atol=1e-5, rtol=1e-5)
    assert math.isclose(float(torch.trace(P)), 4.0, abs_tol=1e-4)


def test_safelora_matrix_of_a_unit_vector_is_a_projector():
    # The one case where the definitions agree: V a single unit direction.
    u = torch.randn(9, 1, generator=gen(1))
    u = u / u.norm()
    C = safelora_projection(u, "safelora").matrix()
    torch.testing.assert_close(C @ C, C, atol=1e-6, rtol=1e-5)


def test_orthonormal_variant_with_eta_keeps_the_fewest_directions_reaching_eta():
    V = torch.randn(10, 6, generator=gen(2)) * torch.tensor([5.0, 4.0, 1.0, 0.5, 0.2, 0.1])
    S = torch.linalg.svdvals(V.double())
    energy = (S**2).cumsum(0) / (S**2).sum()
    for eta in (0.5, 0.9, 0.99):
        k = int((energy < eta).sum()) + 1
        C = safelora_projection(V, "orthonormal", frac=None, eta=eta)
        assert C.rank == k
        assert math.isclose(float(torch.trace(C.matrix())), k, abs_tol=1e-4)


@pytest.mark.parametrize("variant", ["safelora", "orthonormal"])
@pytest.mark.parametrize("cols", [2, 40])
def test_applying_c_equals_the_dense_product(variant, cols):
    V = torch.randn(16, 24, generator=gen(3))
    X = torch.randn(16, cols, generator=gen(4))
    C = safelora_projection(V, variant, frac=0.25)
    torch.testing.assert_close(C(X), C.matrix() @ X, atol=1e-4, rtol=1e-4)


def test_lora_cosine_equals_the_cosine_of_the_full_products():
    B, A = torch.randn(20, 4, generator=gen(5)), torch.randn(4, 30, generator=gen(6))
    C = safelora_projection(torch.randn(20, 30, generator=gen(7)), "safelora")
    got = lora_cosine(B, C(B), A)
    assert math.isclose(got, dense_cosine(B @ A, C.matrix() @ B @ A), rel_tol=1e-5)
    assert math.isclose(got, cosine(B @ A, C(B @ A)), rel_tol=1e-5)
    assert math.isnan(lora_cosine(torch.zeros(20, 4), torch.zeros(20, 4), A))


def test_layer_similarity_reads_a_full_update_or_a_lora_pair():
    B, A = torch.randn(12, 3, generator=gen(8)), torch.randn(3, 7, generator=gen(9))
    C = safelora_projection(torch.randn(12, 7, generator=gen(11)), "safelora")
    full = layer_similarity(C, B @ A)
    assert math.isclose(full, cosine(B @ A, C(B @ A)), rel_tol=1e-6)
    assert math.isclose(layer_similarity(C, B, lora_a=A), full, rel_tol=1e-5)


def test_select_layers_by_threshold_and_by_count():
    sims = {"a": 0.7, "b": 0.2, "c": math.nan, "d": 0.5, "e": 0.9}
    assert select_layers(sims, threshold=0.5) == ["b", "d"]  # at or below τ, in the given order
    assert select_layers(sims, threshold=0.1) == []
    assert select_layers(sims, num_layers=1) == ["b"]
    assert select_layers(sims, num_layers=3) == ["a", "b", "d"]
    assert select_layers(sims, num_layers=10) == ["a", "b", "d", "e"]  # NaN (no update) never
    assert select_layers({"x": 0.3, "y": 0.3, "z": 0.1}, num_layers=2) == ["x", "z"]  # ties: first named
    with pytest.raises(ValueError, match="exactly one"):
        select_layers(sims)
    with pytest.raises(ValueError, match="exactly one"):
        select_layers(sims, threshold=0.5, num_layers=2)
    with pytest.raises(ValueError, match="threshold"):
        select_layers(sims, threshold=math.nan)
    with pytest.raises(ValueError, match="num_layers"):
        select_layers(sims, num_layers=-1)


@pytest.mark.parametrize("variant", ["safelora", "orthonormal"])
def test_apply_safelora_rewrites_exactly_the_selected_updates(variant):
    shapes = {"l0": (8, 6), "l1": (6, 10), "l2": (8, 8), "l3": (5, 5)}
    deltas = {n: torch.randn(*s, generator=gen(10 + i)) for i, (n, s) in enumerate(shapes.items())}
    alignment = {n: torch.randn(*s, generator=gen(20 + i)) for i, (n, s) in enumerate(shapes.items())}
    if variant == "safelora":
        alignment["l3"] = torch.eye(5)  # C ∝ I: the update keeps its direction, cosine 1
    result = apply_safelora(deltas, alignment, num_layers=2, variant=variant, frac=0.5)
    want_sims = {}
    for n in shapes:
        V = alignment[n].double()
        if variant == "safelora":
            C = V @ V.T / V.norm()
        else:
            U = torch.linalg.svd(V)[0][:, : kept(0.5, V.shape)]
            C = U @ U.T
        want_sims[n] = dense_cosine(deltas[n], C @ deltas[n].double())
        assert math.isclose(result.similarities[n], want_sims[n], rel_tol=1e-5)
        if n in result.selected:
            torch.testing.assert_close(result.deltas[n].double(), C @ deltas[n].double(), atol=1e-5, rtol=1e-4)
        else:
            assert torch.equal(result.deltas[n], deltas[n])
    if variant == "safelora":
        assert math.isclose(result.similarities["l3"], 1.0, rel_tol=1e-6)
    assert sorted(result.selected) == sorted(sorted(want_sims, key=want_sims.get)[:2])


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="zero"):
        safelora_projection(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="variant"):
        safelora_projection(torch.ones(4, 4), "svd")
    with pytest.raises(ValueError, match="exactly one of frac and eta"):
        safelora_projection(torch.ones(4, 4), "orthonormal", frac=None, eta=None)
    with pytest.raises(ValueError, match="2-D"):
        safelora_projection(torch.ones(4))
    with pytest.raises(ValueError, match="no alignment matrix for layer 'b'"):
        apply_safelora({"b": torch.ones(2, 2)}, {"a": torch.ones(2, 2)}, threshold=0.5)
    with pytest.raises(ValueError, match="layer 'a'"):
        apply_safelora({"a": torch.ones(2, 3)}, {"a": torch.ones(3, 2)}, threshold=0.5)
