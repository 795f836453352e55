"""SafeLoRA: C = VVᵀ/‖V‖ versus the orthonormal projector, layer selection, exact rewrites in a run."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from safetensors.torch import save_file

from safeproj.callbacks.safelora import (
    SafeLoRA,
    apply_safelora,
    cosine,
    lora_cosine,
    safelora_projection,
    select_layers,
)
from safeproj.core.targets import model_weights
from safeproj.core.deltas import select_names
from safeproj.model.loading import load_model

from helpers.projection import Capture, RandomTokensLM, trainer

def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def kept(frac: float, shape) -> int:
    """k = round(frac·min(m, n)) with halves rounded up (Python's round() would round them to even)."""
    return max(1, math.floor(frac * min(shape) + 0.5))


def dense_cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double().flatten(), y.double().flatten()
    return float(torch.dot(x, y) / (x.norm() * y.norm()))


# --------------------------------------------------------------------------------------------
# Pure math


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


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"variant": "svd"}, "variant"),
        ({"num_layers": 0}, "num_layers"),
        ({"threshold": None}, "threshold or num_layers"),
        ({"threshold": 2.0}, "threshold"),
        ({"frac": 0.0}, "frac"),
        ({"eta": 1.5}, "eta"),
        ({"aligned": "safety:tiny", "base": "tiny"}, "base"),
    ],
)
def test_callback_arguments_are_checked(kwargs, match):
    args = {"aligned": "a", "base": "b", **kwargs}
    with pytest.raises(MisconfigurationException, match=match):
        SafeLoRA(**args)


# --------------------------------------------------------------------------------------------
# In a training run


class Snapshot(Callback):
    """Copies every weight and LoRA factor at train end, before SafeLoRA (placed after it) acts."""

    def on_train_end(self, trainer, pl_module):
        self.state = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}


def alignment_matrix(name: str, shape: tuple[int, int]) -> torch.Tensor:
    """Layer 0: V spans the whole output space where it can (cosine ≈ 1); layer 1: rank one (cosine small)."""
    m, n = shape
    if ".layers.0." in name:
        return 0.05 * torch.eye(m, n)
    u, v = torch.randn(m, 1, generator=gen(len(name))), torch.randn(1, n, generator=gen(m + n))
    return 0.05 * u @ v / (u.norm() * v.norm())


@pytest.fixture(scope="module")
def checkpoint_pair(tmp_path_factory):
    """The tiny preset's weights as a base checkpoint and an 'aligned' one that differs by known V."""
    root = tmp_path_factory.mktemp("safelora-ckpt")
    model, _ = load_model("tiny")
    base = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    names = select_names(base)
    aligned = dict(base)
    V = {}
    for name in names:
        V[name] = alignment_matrix(name, tuple(base[name].shape))
        aligned[name] = (base[name] + V[name]).contiguous()
    for sub, tensors in (("base", base), ("aligned", aligned)):
        (root / sub).mkdir()
        save_file(tensors, str(root / sub / "model.safetensors"))
    # V as the checkpoints store it (fp32 rounding of base + V included).
    V = {n: aligned[n] - base[n] for n in names}
    return str(root / "aligned"), str(root / "base"), V


def run(module, callback, tmp_path, logger=False, steps=4):
    snap = Snapshot()
    trainer(tmp_path, steps, [snap, callback], logger=logger).fit(module)
    return snap.state


def projector(V: torch.Tensor, variant: str, eta: float = 0.99) -> torch.Tensor:
    V = V.double()
    if variant == "safelora":
        return V @ V.T / V.norm()
    U, S, _ = torch.linalg.svd(V)
    energy = (S**2).cumsum(0) / (S**2).sum()
    k = int((energy < eta).sum()) + 1
    return U[:, :k] @ U[:, :k].T


@pytest.mark.parametrize(
    "variant, rule",
    # The orthonormal variant by η: the rank-one alignments of layer 1 then keep their one direction
    # (a rank fraction would add arbitrary directions of V's null space).
    [("safelora", {"threshold": 0.4}), ("safelora", {"num_layers": 3}), ("orthonormal", {"threshold": 0.4, "eta": 0.99})],
)
def test_lora_run_rewrites_exactly_the_selected_layers(tmp_path, checkpoint_pair, variant, rule):
    aligned, base, V = checkpoint_pair
    module = RandomTokensLM(lora=True, rows=16)
    logger = Capture()
    callback = SafeLoRA(aligned, base, variant=variant, **rule)
    before = run(module, callback, tmp_path, logger=logger)
    after = module.model.state_dict()
    weights, _ = model_weights(module.model)

    sims, expected_new_b = {}, {}
    for name in V:
        t = weights[name]
        prefix = "base_model.model." + name.removesuffix(".weight")
        b, a = before[f"{prefix}.lora_B.default.weight"], before[f"{prefix}.lora_A.default.weight"]
        C = projector(V[name], variant)
        delta = t.scaling * b.double() @ a.double()
        sims[name] = dense_cosine(delta, C @ delta)
        expected_new_b[name] = C @ b.double()
    if "threshold" in rule:
        want = {n for n, s in sims.items() if s <= rule["threshold"]}
    else:
        want = set(sorted(sims, key=sims.get)[: rule["num_layers"]])
    assert 0 < len(want) < len(V)  # the alignment was built so that the rule splits the layers
    assert set(callback.selected) == want
    for name, s in sims.items():
        assert math.isclose(callback.similarities[name], s, rel_tol=1e-4, abs_tol=1e-6)

    for key, value in after.items():
        if ".lora_B." in key:
            name = key.removeprefix("base_model.model.").split(".lora_B.")[0] + ".weight"
            if name in want:
                torch.testing.assert_close(value.double(), expected_new_b[name], atol=1e-6, rtol=1e-4)
                # The merged update is C·ΔW exactly: s·(C·B)·A.
                t = weights[name]
                C = projector(V[name], variant)
                prefix = key.split(".lora_B.")[0]
                delta = t.scaling * before[f"{prefix}.lora_B.default.weight"].double() @ before[f"{prefix}.lora_A.default.weight"].double()
                torch.testing.assert_close(t.delta_weight().double(), C @ delta, atol=1e-6, rtol=1e-4)
                assert not torch.equal(value, before[key])
            else:
                assert torch.equal(value, before[key]), key
        else:
            assert torch.equal(value, before[key]), key  # A factors and every base weight untouched

    metrics = {k: v for _, m in logger.logged for k, v in m.items()}
    assert metrics["safelora/projected_layers"] == len(want)
    assert metrics["safelora/total_layers"] == len(V)
    for name in V:
        assert math.isclose(metrics[f"safelora/similarity/{name}"], sims[name], rel_tol=1e-4, abs_tol=1e-6)


def test_full_finetuning_run_sets_w0_plus_c_times_update(tmp_path, checkpoint_pair):
    aligned, base, V = checkpoint_pair
    module = RandomTokensLM(lora=False, rows=16)
    start = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
    callback = SafeLoRA(aligned, base, threshold=0.4)
    trained = run(module, callback, tmp_path)
    after = module.model.state_dict()

    want = set()
    for name in V:
        delta = trained[name].double() - start[name].double()
        C = projector(V[name], "safelora")
        if dense_cosine(delta, C @ delta) <= 0.4:
            want.add(name)
            torch.testing.assert_close(after[name].double(), start[name].double() + C @ delta, atol=1e-6, rtol=1e-5)
    assert 0 < len(want) < len(V)
    assert set(callback.selected) == want
    for key, value in after.items():
        if key not in want:
            assert torch.equal(value, trained[key]), key  # embeddings, norms, lm_head, unselected layers
    state = callback.state_dict()
    assert set(state["initial"]) == set(V) and state["selected"] == callback.selected


def test_delta_that_does_not_fit_the_model_is_refused(tmp_path):
    model, _ = load_model("tiny")
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    wrong = dict(sd)
    name = "model.layers.0.self_attn.q_proj.weight"
    wrong[name] = torch.zeros(3, 3)
    for sub, tensors in (("base", wrong), ("aligned", wrong)):
        (tmp_path / sub).mkdir()
        save_file(tensors, str(tmp_path / sub / "model.safetensors"))
    callback = SafeLoRA(str(tmp_path / "aligned"), str(tmp_path / "base"))
    with pytest.raises(MisconfigurationException, match="q_proj"):
        run(RandomTokensLM(lora=False, rows=16), callback, tmp_path, steps=1)
