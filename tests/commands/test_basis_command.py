"""`safeproj basis`: the options of every basis builder, checked the same way, and the artifact it saves."""

from __future__ import annotations

import pytest

from safeproj.commands.basis import basis_command
from safeproj.core.basis import Basis


def test_saves_a_basis_with_the_chosen_options(tmp_path, checkpoint_pair):
    a, _ = checkpoint_pair
    basis_command(a, str(tmp_path / "half.safetensors"))
    basis = Basis.load(tmp_path / "half.safetensors")
    assert (basis.meta["frac"], basis.meta["eta"], basis.meta["side"]) == (0.5, None, "left")
    basis_command(a, str(tmp_path / "eta.safetensors"), eta=0.3, side="right", selection="random-k", seed=2)
    basis = Basis.load(tmp_path / "eta.safetensors")
    assert (basis.meta["frac"], basis.meta["eta"], basis.meta["side"]) == (None, 0.3, "right")
    assert (basis.meta["selection"], basis.meta["seed"]) == ("random-k", 2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"frac": 0.5, "eta": 0.3}, "frac or eta, not both"),
        ({"frac": 1.5}, "frac must be in"),
        ({"selection": "best"}, "selection 'best'"),
        ({"side": "up"}, "side 'up'"),
        ({"out": "basis.pt"}, "safetensors"),
    ],
)
def test_bad_options_are_refused(tmp_path, checkpoint_pair, kwargs, match):
    arguments = {"delta": checkpoint_pair[0], "out": str(tmp_path / "b.safetensors"), **kwargs}
    with pytest.raises(ValueError, match=match):
        basis_command(**arguments)
    assert not (tmp_path / "b.safetensors").exists()
