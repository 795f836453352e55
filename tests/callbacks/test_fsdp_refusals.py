"""Callbacks without a sharded implementation refuse FSDP2 at setup, in one line naming themselves."""

from types import SimpleNamespace

import pytest
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

from safeproj.callbacks._sharding import shards_weights
from safeproj.callbacks.activation_recorder import ActivationRecorder
from safeproj.callbacks.overlap import OverlapCallback
from safeproj.callbacks.safelora import SafeLoRA


def _trainer(strategy):
    return SimpleNamespace(strategy=strategy, default_root_dir=".", is_global_zero=True)


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: OverlapCallback({"safety": "tuned,base"}), "OverlapCallback"),
        (lambda: SafeLoRA("tuned,base"), "SafeLoRA"),
        (lambda: ActivationRecorder(), "ActivationRecorder"),
    ],
)
def test_sharding_strategies_are_refused_at_setup(make, name):
    with pytest.raises(ValueError, match=rf"^{name} does not support FSDP2 \(ModelParallelStrategy\)") as err:
        make().setup(_trainer(ModelParallelStrategy()), SimpleNamespace(), "fit")
    assert "\n" not in str(err.value)


def test_only_sharding_strategies_shard_weights():
    assert shards_weights(_trainer(ModelParallelStrategy()))
    assert not shards_weights(_trainer(DDPStrategy()))
