"""Callbacks without a sharded implementation refuse FSDP2 at setup, in one line naming themselves;
ActivationRecorder, which has one, sets up."""

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
    ],
)
def test_sharding_strategies_are_refused_at_setup(make, name):
    with pytest.raises(ValueError, match=rf"^{name} does not support FSDP2 \(ModelParallelStrategy\)") as err:
        make().setup(_trainer(ModelParallelStrategy()), SimpleNamespace(), "fit")
    assert "\n" not in str(err.value)


def test_only_sharding_strategies_shard_weights():
    assert shards_weights(_trainer(ModelParallelStrategy()))
    assert not shards_weights(_trainer(DDPStrategy()))


def test_activation_recorder_sets_up_under_fsdp2(tiny_lm, prompt_files, tmp_path):
    sets, _, _ = prompt_files
    recorder = ActivationRecorder(prompt_sets=sets, num_prompts=4, layers=[0], analyse=False)
    trainer = SimpleNamespace(strategy=ModelParallelStrategy(), default_root_dir=str(tmp_path), is_global_zero=True)
    recorder.setup(trainer, tiny_lm(), "fit")  # one process: no other rank's prompts to compare
    assert recorder._dir == tmp_path / "activations" and recorder._layer_indices == [0]
