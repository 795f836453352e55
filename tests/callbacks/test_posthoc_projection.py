"""Post hoc projection: each variant the evaluators see is exactly W₀ + P·Δ_T, and training's weights come back."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException

from safeproj.callbacks.posthoc_projection import PosthocProjection
from safeproj.core.basis import build_basis
from safeproj.core.deltas import RunDelta, TensorDelta, select_names
from safeproj.core.energy import SubspaceGrid, Variant
from safeproj.core.projector import project
from safeproj.core.targets import find_weights
from safeproj.core.variants import run_variants
from safeproj.model.loading import load_model

Q0 = "model.layers.0.self_attn.q_proj.weight"


class Probe:
    """An evaluator that keeps a copy of every target weight it was shown."""

    prefix = "probe"

    def __init__(self, targets, fail_at: int | None = None):
        self.targets, self.fail_at = targets, fail_at
        self.seen: list[dict[str, torch.Tensor]] = []

    def evaluate(self, module):
        if self.fail_at is not None and len(self.seen) == self.fail_at:
            raise RuntimeError("evaluator failed")
        self.seen.append({t.name: t.weight.detach().clone() for t in self.targets})
        return {"calls": float(len(self.seen))}


@pytest.fixture()
def setting():
    """A tiny model 'trained' by a random update Δ_T, and a reference delta whose subspace projects it."""
    model, _ = load_model("tiny")
    names = select_names([n for n, _ in model.named_parameters()])
    targets = find_weights(model, names)
    g = torch.Generator().manual_seed(3)
    initial = {t.name: t.weight.detach().clone() for t in targets}
    reference = {n: torch.randn(w.shape, generator=g) for n, w in initial.items()}
    with torch.no_grad():
        for t in targets:
            t.weight.add_(0.1 * torch.randn(t.weight.shape, generator=g))
    trained = {t.name: t.weight.detach().clone() for t in targets}
    zeros = {n: torch.zeros_like(w) for n, w in reference.items()}
    return model, targets, initial, trained, TensorDelta(reference, zeros)


@pytest.mark.parametrize("keep", ["parallel", "orthogonal"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_every_variant_is_the_initial_weights_plus_the_projected_update(setting, keep, side):
    model, targets, initial, trained, reference = setting
    grid = SubspaceGrid(reference, [t.name for t in targets], side=side, seed=5, progress=False)
    variants = [Variant(f, s) for f in (0.25, 0.5) for s in ("top", "random-k", "random")]
    probe = Probe(targets)
    rows = list(run_variants(model, RunDelta(targets, held=initial), grid, variants, keep, [probe]))

    assert [r["variant"] for r in rows] == ["full"] + [v.name for v in variants]
    assert rows[0]["energy_kept"] == pytest.approx(1.0)
    for name, w in probe.seen[0].items():
        torch.testing.assert_close(w, trained[name], rtol=0, atol=0)
    for i, (variant, row, seen) in enumerate(zip(variants, rows[1:], probe.seen[1:]), start=1):
        # The same subspace a basis file with these settings holds (random controls seeded per tensor alike).
        basis = build_basis(
            reference, frac=variant.frac, selection=variant.selection, side=side, seed=5, progress=False
        )
        kept = total = 0.0
        for t in targets:
            delta = trained[t.name] - initial[t.name]
            projected = project(delta, basis.entries[t.name], keep)
            torch.testing.assert_close(seen[t.name], initial[t.name] + projected, rtol=1e-5, atol=1e-5)
            kept += float(projected.pow(2).sum())
            total += float(delta.pow(2).sum())
        assert row["energy_kept"] == pytest.approx(kept / total, rel=1e-4), variant.name
        assert row["probe/calls"] == i + 1
    for t in targets:  # the trained weights are back, bit for bit
        assert torch.equal(t.weight, trained[t.name])


def test_random_control_is_nested_across_fracs_and_differs_from_top(setting):
    _, targets, _, _, reference = setting
    grid = SubspaceGrid(reference, [t.name for t in targets], side="left", seed=0, progress=False)
    name = targets[0].name
    small = grid.entry(name, Variant(0.25, "random")).left.Q
    large = grid.entry(name, Variant(0.5, "random")).left.Q
    top = grid.entry(name, Variant(0.25, "top")).left.Q
    # One Gaussian per tensor: the smaller random subspace lies inside the larger one.
    torch.testing.assert_close(large @ (large.T @ small), small, rtol=0, atol=1e-5)
    assert (top.T @ small).norm() ** 2 / small.shape[1] < 0.9


def test_a_failing_evaluator_leaves_the_trained_weights_in_place(setting):
    model, targets, initial, trained, reference = setting
    grid = SubspaceGrid(reference, [t.name for t in targets], progress=False)
    probe = Probe(targets, fail_at=2)
    with pytest.raises(RuntimeError, match="evaluator failed"):
        variants = [Variant(0.25, "top"), Variant(0.5, "top")]
        list(run_variants(model, RunDelta(targets, held=initial), grid, variants, "parallel", [probe]))
    for t in targets:
        assert torch.equal(t.weight, trained[t.name])


def test_spectra_kept_on_disk_give_the_same_variants(setting, tmp_path):
    model, targets, initial, _, reference = setting
    names = [t.name for t in targets]
    variants = [Variant(f, s) for f in (0.25, 0.5) for s in ("top", "random-k", "random")]
    results = {}
    for where, folder in (("memory", None), ("disk", tmp_path)):
        grid = SubspaceGrid(reference, names, side="both", seed=5, progress=False, cache_dir=folder)
        probe = Probe(targets)
        rows = list(run_variants(model, RunDelta(targets, held=initial), grid, variants, "parallel", [probe]))
        results[where] = rows, probe.seen
    assert all(not cache._memory for cache in grid.caches.values())  # no tensor's vectors held between uses
    assert results["disk"][0] == results["memory"][0]
    for on_disk, in_memory in zip(results["disk"][1], results["memory"][1]):
        assert all(torch.equal(on_disk[name], in_memory[name]) for name in names)


class Evaluator(L.Callback):
    """A callback with `evaluate`, as UtilityEval and HarmEval have: the norm of one weight. It also notes
    which start copies a PosthocProjection listed before it holds once training starts."""

    prefix = "probe"

    def __init__(self, posthoc):
        self.posthoc, self.held = posthoc, None

    def on_train_start(self, trainer, pl_module):
        self.held = dict(self.posthoc._run.held)

    def evaluate(self, module):
        return {"q0": float(module.model.get_parameter(Q0).detach().norm())}


def test_callback_scores_the_run_from_its_start_on_disk(tmp_path):
    from helpers.overlap import write_checkpoint
    from helpers.projection import TinyLM, loader, trainer

    module = TinyLM()
    start = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    module.base_dir = write_checkpoint(tmp_path / "start", start)
    gen = torch.Generator().manual_seed(7)
    tuned = {n: t + torch.randn(t.shape, generator=gen) for n, t in start.items()}
    reference = f"{write_checkpoint(tmp_path / 'tuned', tuned)},{module.base_dir}"
    callback = PosthocProjection(reference, fracs=[0.5], selections=["top", "random"], out_dir=str(tmp_path / "out"))
    evaluator = Evaluator(callback)
    trainer(tmp_path / "root", 2, [callback, evaluator]).fit(module, loader(2))

    assert evaluator.held == {}  # W₀ came from the start folder: no copy was held
    assert [r["variant"] for r in callback.rows] == ["full", "top@0.5", "random@0.5"]
    trained = float(module.model.get_parameter(Q0).detach().norm())
    assert callback.rows[0]["probe/q0"] == trained != callback.rows[1]["probe/q0"]
    assert all(0 < r["energy_kept"] <= 1 for r in callback.rows)
    assert (tmp_path / "out" / "posthoc.csv").is_file()
    assert not list((tmp_path / "root").glob(".posthoc-spectra-*"))  # the spectra folder is gone


def test_bad_arguments_are_refused():
    for kwargs, match in [
        ({"keep": "inside"}, "keep='inside'"),
        ({"fracs": [0.5, 1.5]}, "frac=1.5"),
        ({"selections": ["best"]}, "selection 'best'"),
        ({"side": "up"}, "side 'up'"),
    ]:
        with pytest.raises(MisconfigurationException, match=match):
            PosthocProjection("x,y", **kwargs)
