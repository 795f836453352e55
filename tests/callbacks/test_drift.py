"""SubspaceDrift: the logged share equals ‖PΔW‖²/‖ΔW‖² of the run's update, alone and beside OnlineProjection."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from helpers.projection import Capture, RandomTokensLM, trainer
from safeproj.callbacks import drift as drift_module
from safeproj.callbacks.drift import SubspaceDrift
from safeproj.callbacks.online_projection import OnlineProjection
from safeproj.core.basis import Basis, build_basis
from safeproj.core.deltas import TensorDelta
from safeproj.core.targets import model_weights
from safeproj.model.loading import load_model


@pytest.fixture(scope="module")
def basis_file(tmp_path_factory):
    """A basis (left side, k = m/4) from a random delta of the tiny model's projection weights."""
    model, _ = load_model("tiny")
    start = dict(model.state_dict())
    gen = torch.Generator().manual_seed(1)
    end = {k: v + torch.randn(v.shape, generator=gen) for k, v in start.items()}
    path = tmp_path_factory.mktemp("drift-basis") / "basis.safetensors"
    build_basis(TensorDelta(end, start), frac=0.25, side="left", progress=False).save(path)
    return str(path)


def fit(module, callbacks, tmp_path, steps, logger=False, ckpt_path=None, accumulate=1):
    run = trainer(tmp_path, steps, callbacks, logger=logger, accumulate_grad_batches=accumulate, log_every_n_steps=50)
    run.fit(module, ckpt_path=ckpt_path)
    return run


def projector(entry) -> torch.Tensor:
    """P = QQᵀ of the kept directions, or I − QQᵀ when the basis stores the complement."""
    Q = entry.left.Q.double()
    P = Q @ Q.T
    return torch.eye(Q.shape[0], dtype=torch.float64) - P if entry.left.complement else P


def shares(updates: dict[str, torch.Tensor], basis: Basis) -> tuple[dict[str, float], float]:
    """Per-weight and pooled ‖PΔW‖²/‖ΔW‖², computed from the explicit projector."""
    per, kept, total = {}, 0.0, 0.0
    for name, delta in updates.items():
        d = delta.double()
        inside = float((projector(basis.entries[name]) @ d).square().sum())
        energy = float(d.square().sum())
        per[name] = inside / energy
        kept, total = kept + inside, total + energy
    return per, kept / total


def rows_at(history: list[dict], step: int) -> dict[str, dict]:
    return {r["name"]: r for r in history if r["step"] == step}


def test_arguments_are_checked():
    for kwargs, match in [
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"selection": "bottom"}, "selection"),
        ({"side": "up"}, "side"),
        ({"frac": 1.5}, "frac"),
        ({"eta": 0.0}, "eta"),
    ]:
        with pytest.raises(MisconfigurationException, match=match):
            SubspaceDrift("basis.safetensors", **kwargs)


def test_unprojected_run_logs_the_share_of_its_update(tmp_path, basis_file, monkeypatch):
    images = []
    monkeypatch.setattr(drift_module, "log_images", lambda loggers, key, paths, step=None: images.append((key, paths)))
    module = RandomTokensLM()
    start = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
    logger = Capture()
    callback = SubspaceDrift(basis_file, every_n_steps=2)
    # 2 batches per optimizer step: the hook sees every micro-batch but must measure once per step.
    trainer = fit(module, [callback], tmp_path, steps=5, logger=logger, accumulate=2)
    basis = Basis.load(basis_file)

    assert sorted({r["step"] for r in callback.history}) == [2, 4, 5]  # every 2 steps, and at train end
    end = module.model.state_dict()
    per, pooled = shares({n: end[n] - start[n] for n in basis.entries}, basis)
    final = rows_at(callback.history, 5)
    for name, want in per.items():
        assert math.isclose(final[name]["share"], want, rel_tol=1e-4), name
        m = basis.entries[name].shape[0]
        assert math.isclose(final[name]["random"], basis.entries[name].left.k / m)
    assert math.isclose(final["overall"]["share"], pooled, rel_tol=1e-4)
    # An unprojected update is not confined to the subspace: strictly between 0 and 1.
    assert 0.01 < pooled < 0.99

    steps = [step for step, m in logger.logged if "drift/overall" in m]
    assert steps == [2, 4, 5]
    last = next(m for step, m in logger.logged if step == 5 and "drift/overall" in m)
    assert math.isclose(last["drift/overall"], pooled, rel_tol=1e-4)
    # Also in callback metrics (monitors, progress bar), from the last in-training measurement.
    step4 = next(m for step, m in logger.logged if step == 4 and "drift/overall" in m)
    assert math.isclose(float(trainer.callback_metrics["drift/overall"]), step4["drift/overall"], rel_tol=1e-6)
    layer0 = [v for n, v in per.items() if ".layers.0." in n]
    assert math.isclose(last["drift/layer_0"], sum(layer0) / len(layer0), rel_tol=1e-4)
    energies = {n: float((end[n] - start[n]).double().square().sum()) for n in per}
    want_random = sum(final[n]["random"] * e for n, e in energies.items()) / sum(energies.values())
    assert math.isclose(last["drift/random"], want_random, rel_tol=1e-4)

    out = tmp_path / "drift"
    with open(out / "drift.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * (len(basis.entries) + 1)
    assert (out / "drift_heatmap.png").stat().st_size > 1000
    assert images == [("drift/heatmap", [str(out / "drift_heatmap.png")])]


@pytest.mark.parametrize("keep, want", [("parallel", 1.0), ("orthogonal", 0.0)])
def test_beside_online_projection_the_share_is_all_or_nothing(tmp_path, basis_file, keep, want):
    callback = SubspaceDrift(basis_file, every_n_steps=1, out_dir=str(tmp_path / "out"))
    fit(RandomTokensLM(), [OnlineProjection(basis_file, keep=keep), callback], tmp_path, steps=3)
    assert sorted({r["step"] for r in callback.history}) == [1, 2, 3]
    for row in callback.history:
        assert row["energy"] > 0
        assert math.isclose(row["share"], want, abs_tol=1e-4), row
    assert 0.1 <= callback.history[-1]["random"] <= 0.25  # k = min(m, n)/4 over m in 64..160


def test_lora_update_is_scale_b_a(tmp_path, basis_file):
    module = RandomTokensLM(lora=True)
    callback = SubspaceDrift(basis_file, every_n_steps=3, out_dir=str(tmp_path / "out"))
    fit(module, [callback], tmp_path, steps=3)
    basis = Basis.load(basis_file)
    weights, _ = model_weights(module.model)
    updates = {}
    for name in basis.entries:
        t = weights[name]
        assert t.is_lora
        updates[name] = t.scaling * t.lora_b.detach().double() @ t.lora_a.detach().double()
    per, pooled = shares(updates, basis)
    final = rows_at(callback.history, 3)
    for name, value in per.items():
        assert math.isclose(final[name]["share"], value, rel_tol=1e-4), name
    assert math.isclose(final["overall"]["share"], pooled, rel_tol=1e-4)


def test_resume_measures_against_the_original_start(tmp_path, basis_file):
    module = RandomTokensLM()
    start = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
    first = SubspaceDrift(basis_file, every_n_steps=2, out_dir=str(tmp_path / "out"))
    trainer = fit(module, [first], tmp_path / "a", steps=2)
    state = first.state_dict()
    assert isinstance(state["history"], list) and all(
        isinstance(v, (int, float, str)) for r in state["history"] for v in r.values()
    )
    assert set(state["initial"]) == set(Basis.load(basis_file).entries)
    ckpt = tmp_path / "step2.ckpt"
    trainer.save_checkpoint(ckpt)
    middle = {k: v.detach().clone() for k, v in module.model.state_dict().items()}

    resumed = SubspaceDrift(basis_file, every_n_steps=2, out_dir=str(tmp_path / "out"))
    fit(RandomTokensLM(), [resumed], tmp_path / "b", steps=4, ckpt_path=str(ckpt))
    # The resumed module is a fresh one: read the end weights off the callback's own targets.
    end = {t.name: t.weight.detach() for t in resumed.targets}
    basis = Basis.load(basis_file)
    _, from_start = shares({n: end[n] - start[n] for n in basis.entries}, basis)
    _, from_middle = shares({n: end[n] - middle[n] for n in basis.entries}, basis)
    assert abs(from_start - from_middle) > 1e-3  # the check below can tell the two apart
    assert sorted({r["step"] for r in resumed.history}) == [2, 4]  # history carried over
    assert math.isclose(rows_at(resumed.history, 4)["overall"]["share"], from_start, rel_tol=1e-4)


def test_basis_for_another_model_is_refused(tmp_path):
    start = {"model.layers.0.self_attn.q_proj.weight": torch.zeros(5, 5)}
    end = {"model.layers.0.self_attn.q_proj.weight": torch.randn(5, 5)}
    path = tmp_path / "other.safetensors"
    build_basis(TensorDelta(end, start), frac=0.5, progress=False).save(path)
    with pytest.raises(MisconfigurationException, match="q_proj"):
        fit(RandomTokensLM(), [SubspaceDrift(str(path))], tmp_path, steps=1)
