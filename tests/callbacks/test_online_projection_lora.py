"""With LoRA, s·B·A stays in range(P) (or its complement) for every keep × side × on, with plain SGD."""

import pytest
from lightning.fabric.utilities.exceptions import MisconfigurationException

from helpers.projection import TinyLM, loader, random_basis, trainer
from safeproj.callbacks.online_projection import OnlineProjection
from safeproj.core.projector import project


@pytest.mark.parametrize("on", ["update", "grad"])
@pytest.mark.parametrize("side", ["left", "right", "both"])
@pytest.mark.parametrize("keep", ["parallel", "orthogonal"])
def test_lora_merged_update_stays_on_its_side_of_the_subspace(tmp_path, keep, side, on):
    path = tmp_path / "b.safetensors"
    basis = random_basis(TinyLM().model, path, frac=0.25, side=side)
    module = TinyLM(optimizer="sgd", lr=0.5, lora=True)
    cb = OnlineProjection(str(path), keep=keep, on=on, side=side)
    run = trainer(tmp_path, 3, [cb])
    if keep == "orthogonal" and side == "both":
        with pytest.raises(MisconfigurationException, match="side='both' cannot be applied to LoRA"):
            run.fit(module, loader(3))
        return
    run.fit(module, loader(3))
    targets = [t for t in cb.targets if t.is_lora]
    assert targets
    other = "orthogonal" if keep == "parallel" else "parallel"
    for t in targets:
        delta = t.delta_weight().detach()
        assert delta.norm() > 0, t.name
        outside = project(delta, basis.entries[t.name], other)
        assert float(outside.norm() / delta.norm()) < 1e-5, t.name
