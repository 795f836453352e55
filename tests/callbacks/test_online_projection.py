"""OnlineProjection keeps W − W₀ in range(P) (or its complement) — checked against the mathematics."""

import lightning as L
import pytest
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException

from helpers.projection import Repeat, TinyLM, batch, loader, random_basis, trainer
from safeproj.callbacks.online_projection import OnlineProjection
from safeproj.core.basis import Basis
from safeproj.core.projector import project


def _weights(module, names):
    params = dict(module.model.named_parameters())
    return {n: params[n].detach().clone() for n in names}


def _outside_share(basis: Basis, start, end, keep: str, per_rounding: bool = False) -> float:
    """Largest relative norm of the part of W − W₀ that projection should have removed.

    With `per_rounding`, in units of fp32 rounding of the stored weights: ε·‖W‖/‖W − W₀‖ is the
    smallest error any fp32 weight update can have relative to the update, projected or not.
    """
    other = "orthogonal" if keep == "parallel" else "parallel"
    eps = torch.finfo(torch.float32).eps
    worst = 0.0
    for name, entry in basis.entries.items():
        delta = end[name] - start[name]
        if delta.norm() == 0:
            continue
        share = float(project(delta, entry, other).norm() / delta.norm())
        if per_rounding:
            share /= eps * float(end[name].norm() / delta.norm())
        worst = max(worst, share)
    return worst


def test_one_sgd_step_with_grad_projection_equals_posthoc_projection(tmp_path):
    plain = TinyLM(optimizer="sgd", lr=0.1)
    basis = random_basis(plain.model, tmp_path / "b.safetensors")
    start = _weights(plain, basis.entries)
    trainer(tmp_path / "plain", 1).fit(plain, loader(1))
    unprojected = _weights(plain, basis.entries)

    projected = TinyLM(optimizer="sgd", lr=0.1)
    cb = OnlineProjection(str(tmp_path / "b.safetensors"), keep="parallel", on="grad")
    trainer(tmp_path / "proj", 1, [cb]).fit(projected, loader(1))
    online = _weights(projected, basis.entries)
    for name, entry in basis.entries.items():
        expected = start[name] + project(unprojected[name] - start[name], entry, "parallel")
        torch.testing.assert_close(online[name], expected, rtol=1e-5, atol=1e-6)
    assert cb.projected_steps == 1


@pytest.mark.parametrize("keep", ["parallel", "orthogonal"])
def test_many_sgd_steps_with_grad_projection_stay_in_the_subspace(tmp_path, keep):
    module = TinyLM(optimizer="sgd", lr=0.05)
    basis = random_basis(module.model, tmp_path / "b.safetensors", frac=0.5)
    start = _weights(module, basis.entries)
    trainer(tmp_path, 8, [OnlineProjection(str(tmp_path / "b.safetensors"), keep=keep, on="grad")]).fit(
        module, loader(8)
    )
    end = _weights(module, basis.entries)
    assert any((end[n] - start[n]).norm() > 1e-3 for n in end)
    # Plain SGD keeps projected gradients in range(P): what is left is fp32 rounding of W, a few ε·‖W‖
    # per step (an unprojected run is ~1e5 such units away).
    assert _outside_share(basis, start, end, keep, per_rounding=True) < 8 * 4


class _EveryStep(L.Callback):
    """Measures, after every optimizer step, how far W − W₀ has left the kept subspace."""

    def __init__(self, basis, start, keep):
        self.basis, self.start, self.keep, self.worst = basis, start, keep, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.worst.append(_outside_share(self.basis, self.start, _weights(pl_module, self.basis.entries), self.keep))


@pytest.mark.parametrize("keep", ["parallel", "orthogonal"])
@pytest.mark.parametrize("side,frac", [("left", 0.25), ("right", 0.75)])  # kept basis / complement stored
def test_adamw_with_update_projection_stays_in_the_subspace_every_step(tmp_path, keep, side, frac):
    module = TinyLM(optimizer="adamw", lr=1e-2)
    basis = random_basis(module.model, tmp_path / "b.safetensors", frac=frac, side=side)
    assert any(e.factors()[side].complement for e in basis.entries.values()) == (frac > 0.5)
    start = _weights(module, basis.entries)
    probe = _EveryStep(basis, start, keep)
    cb = OnlineProjection(str(tmp_path / "b.safetensors"), keep=keep, on="update", side=side)
    trainer(tmp_path, 6, [cb, probe]).fit(module, loader(6))
    assert len(probe.worst) == 6 and max(probe.worst) < 1e-6
    # Without projection AdamW leaves the subspace at once: the check above can fail.
    free = TinyLM(optimizer="adamw", lr=1e-2)
    free_probe = _EveryStep(basis, _weights(free, basis.entries), keep)
    trainer(tmp_path / "free", 2, [free_probe]).fit(free, loader(2))
    assert min(free_probe.worst) > 0.1


def test_adamw_grad_projection_is_not_exact_but_update_projection_is(tmp_path):
    # AdamW's element-wise scaling moves projected gradients out of range(P): the reason for on="update".
    module = TinyLM(optimizer="adamw", lr=1e-2)
    basis = random_basis(module.model, tmp_path / "b.safetensors", frac=0.25)
    start = _weights(module, basis.entries)
    trainer(tmp_path, 3, [OnlineProjection(str(tmp_path / "b.safetensors"), keep="parallel", on="grad")]).fit(
        module, loader(3)
    )
    assert _outside_share(basis, start, _weights(module, basis.entries), "parallel") > 1e-3


@pytest.mark.parametrize("side", ["left", "right"])
def test_lora_merged_update_stays_in_the_subspace(tmp_path, side):
    basis = random_basis(TinyLM().model, tmp_path / "b.safetensors", frac=0.25, side=side)
    module = TinyLM(optimizer="adamw", lr=1e-2, lora=True)
    cb = OnlineProjection(str(tmp_path / "b.safetensors"), keep="parallel", on="update", side=side)
    trainer(tmp_path, 5, [cb]).fit(module, loader(5))
    lora_targets = [t for t in cb.targets if t.is_lora]
    assert lora_targets, "the LoRA pairs must be found"
    for t in lora_targets:
        delta = t.delta_weight().detach()
        assert delta.norm() > 0
        outside = project(delta, basis.entries[t.name], "orthogonal")
        assert float(outside.norm() / delta.norm()) < 1e-5


def test_gradient_accumulation_projects_once_per_optimizer_step(tmp_path):
    module = TinyLM(optimizer="adamw")
    random_basis(module.model, tmp_path / "b.safetensors")
    cb = OnlineProjection(str(tmp_path / "b.safetensors"), keep="orthogonal", on="update")
    trainer(tmp_path, 3, [cb], accumulate_grad_batches=4).fit(module, loader(12))
    # One projection per optimizer step, not per micro-batch.
    assert cb.projected_steps == 3


def test_resumed_run_ends_with_the_same_weights(tmp_path):
    path = str(tmp_path / "b.safetensors")
    random_basis(TinyLM().model, path, frac=0.5)

    def run(steps, root, ckpt_path=None, checkpoint=False):
        module = TinyLM(optimizer="adamw", lr=1e-2)
        cbs = [OnlineProjection(path, keep="orthogonal", on="update")]
        if checkpoint:
            cbs.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=root, every_n_train_steps=3, save_top_k=-1))
        t = L.Trainer(
            max_steps=steps,
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=checkpoint,
            default_root_dir=str(root),
            callbacks=cbs,
        )
        # One batch repeated: a resumed epoch restarts its dataloader, so only then do both runs see the same data.
        same = torch.utils.data.DataLoader(Repeat([batch(0)] * 6), batch_size=None)
        t.fit(module, same, ckpt_path=ckpt_path)
        return {n: p.detach().clone() for n, p in module.model.named_parameters()}

    straight = run(6, tmp_path / "a")
    run(3, tmp_path / "b", checkpoint=True)
    ckpt = next((tmp_path / "b").glob("*step=3*.ckpt"))
    resumed = run(6, tmp_path / "b", ckpt_path=str(ckpt))
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=1e-6, atol=1e-7)


def test_bad_arguments_and_foreign_basis_name_the_problem(tmp_path):
    with pytest.raises(MisconfigurationException, match="keep='sideways'"):
        OnlineProjection("x.safetensors", keep="sideways")
    with pytest.raises(MisconfigurationException, match="on='weights'"):
        OnlineProjection("x.safetensors", on="weights")
    # A basis built for a wider model does not fit the tiny one.
    from safeproj.model.loading import tiny_model

    wide, _ = tiny_model(hidden=128)
    random_basis(wide, tmp_path / "wide.safetensors")
    cb = OnlineProjection(str(tmp_path / "wide.safetensors"))
    with pytest.raises(MisconfigurationException, match=r"OnlineProjection: .*model\.layers\.0\."):
        trainer(tmp_path, 1, [cb]).fit(TinyLM(), loader(1))
    missing = OnlineProjection(str(tmp_path / "missing.safetensors"))
    with pytest.raises((MisconfigurationException, FileNotFoundError), match="missing.safetensors"):
        trainer(tmp_path, 1, [missing]).fit(TinyLM(), loader(1))
