"""SafeLoRA callback: argument checks, exact rewrites of the selected layers in a run, its state."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from safetensors.torch import save_file

from helpers.projection import Capture, RandomTokensLM, trainer
from safeproj.callbacks.safelora import SafeLoRA
from safeproj.core.deltas import select_names
from safeproj.core.targets import model_weights
from safeproj.model.loading import load_model


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def dense_cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double().flatten(), y.double().flatten()
    return float(torch.dot(x, y) / (x.norm() * y.norm()))


# --------------------------------------------------------------------------------------------
# Arguments


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
    [
        ("safelora", {"threshold": 0.4}),
        ("safelora", {"num_layers": 3}),
        ("orthonormal", {"threshold": 0.4, "eta": 0.99}),
    ],
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
                b, a = before[f"{prefix}.lora_B.default.weight"], before[f"{prefix}.lora_A.default.weight"]
                delta = t.scaling * b.double() @ a.double()
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


@pytest.mark.parametrize("start_from", ["disk", "checkpoint"])
def test_full_finetuning_w0_is_the_run_start_from_disk_or_a_resumed_checkpoint(tmp_path, checkpoint_pair, start_from):
    aligned, base, V = checkpoint_pair
    module = RandomTokensLM(lora=False, rows=16)
    start = {k: v.detach().clone().contiguous() for k, v in module.model.state_dict().items()}
    with torch.no_grad():  # as if resumed mid-run: the weights at train start are no longer W₀
        for i, name in enumerate(V):
            weight = module.model.get_parameter(name)
            weight.add_(0.02 * torch.randn(weight.shape, generator=gen(100 + i)))
    callback = SafeLoRA(aligned, base, threshold=0.4)
    if start_from == "disk":
        (tmp_path / "start").mkdir()
        save_file(start, str(tmp_path / "start" / "model.safetensors"))
        module.base_dir = str(tmp_path / "start")
    else:
        callback.load_state_dict({"initial": {name: start[name] for name in V}})
    trained = run(module, callback, tmp_path / "run")
    after = module.model.state_dict()

    want = set()
    for name in V:
        delta = trained[name].double() - start[name].double()
        C = projector(V[name], "safelora")
        assert math.isclose(callback.similarities[name], dense_cosine(delta, C @ delta), rel_tol=1e-4, abs_tol=1e-6)
        if name in callback.selected:
            want.add(name)
            torch.testing.assert_close(after[name].double(), start[name].double() + C @ delta, atol=1e-6, rtol=1e-5)
    assert want
    # Starts on disk are read back, not copied into the checkpoint; restored ones are kept for the next resume.
    assert set(callback.state_dict()["initial"]) == (set() if start_from == "disk" else set(V))


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


def test_fsdp_v1_is_refused_at_setup():
    trainer = SimpleNamespace(strategy=FSDPStrategy(), default_root_dir=".", is_global_zero=True)
    with pytest.raises(ValueError, match=r"^SafeLoRA does not support FSDP \(FSDPStrategy\)") as err:
        SafeLoRA("tuned,base").setup(trainer, SimpleNamespace(), "fit")
    assert "\n" not in str(err.value)
