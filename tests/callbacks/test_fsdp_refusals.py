"""Which strategies shard the weights, and ActivationRecorder setting up under FSDP2 (the sharded Overlap and
SafeLoRA paths, and their refusal of FSDP v1, are tested in test_fsdp_overlap_safelora.py and beside them)."""

from types import SimpleNamespace

from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

from safeproj.callbacks._sharding import shards_weights
from safeproj.callbacks.activation_recorder import ActivationRecorder


def _trainer(strategy):
    return SimpleNamespace(strategy=strategy, default_root_dir=".", is_global_zero=True)


def test_only_sharding_strategies_shard_weights():
    assert shards_weights(_trainer(ModelParallelStrategy()))
    assert not shards_weights(_trainer(DDPStrategy()))


def test_activation_recorder_sets_up_under_fsdp2(tiny_lm, prompt_files, tmp_path):
    sets, _, _ = prompt_files
    recorder = ActivationRecorder(prompt_sets=sets, num_prompts=4, layers=[0], analyse=False)
    trainer = SimpleNamespace(strategy=ModelParallelStrategy(), default_root_dir=str(tmp_path), is_global_zero=True)
    recorder.setup(trainer, tiny_lm(), "fit")  # one process: no other rank's prompts to compare
    assert recorder._dir == tmp_path / "activations" and recorder._layer_indices == [0]
