"""`safeproj.callbacks` names every public callback, and importing one does not import the others."""

from __future__ import annotations

import subprocess
import sys

import pytest
from lightning.pytorch import Callback

import safeproj.callbacks


@pytest.mark.parametrize("name", safeproj.callbacks.__all__)
def test_every_export_is_a_callback_of_its_own_module(name):
    cls = getattr(safeproj.callbacks, name)
    assert issubclass(cls, Callback) and cls.__name__ == name
    assert cls.__module__.startswith("safeproj.callbacks.") and not cls.__module__.rsplit(".", 1)[-1].startswith("_")


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="NoSuchCallback"):
        safeproj.callbacks.NoSuchCallback  # noqa: B018


def test_importing_one_callback_leaves_the_others_unimported():
    code = (
        "import sys; from safeproj.callbacks import SafeLoRA; "
        "print(sorted(m for m in sys.modules if m.startswith('safeproj.callbacks.')))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "safeproj.callbacks.safelora" in loaded
    for other in ("utility_eval", "harm_eval", "posthoc_projection", "activation_recorder"):
        assert f"safeproj.callbacks.{other}'" not in loaded
