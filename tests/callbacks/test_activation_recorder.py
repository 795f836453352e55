"""ActivationRecorder: argument checks, setup, resume state, and short Trainer runs."""

from __future__ import annotations

import json

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from safeproj.callbacks import activation_recorder as rec
from safeproj.callbacks.activation_recorder import ActivationRecorder
from safeproj.model.activations import decoder_layers
from safeproj.model.recordings import load_activations, recorded_steps


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"position": "first"}, "position must be one of"),
        ({"dtype": "float16"}, "dtype must be one of"),
        ({"num_prompts": 0}, "num_prompts must be"),
        ({"every_n_steps": -1}, "every_n_steps must be"),
        ({"shard_size": 0}, "shard_size must be"),
        ({"layers": [2.5]}, "outside"),
        ({"layers": []}, "non-empty"),
        ({"prompt_sets": {}}, "prompt_sets is empty"),
        ({"prompt_sets": {"a/b": "x.jsonl"}}, "prompt set name"),
        ({"prompt_sets": {"x": "builtin:harmful-test"}}, "analyse=True contrasts"),
        ({"prompt_sets": {"harmful": "nonsense", "benign": "builtin:benign-test"}}, "unknown prompt set 'nonsense'"),
        ({"etas": [0.0]}, "etas must be"),
        ({"probe_test_size": 1.0}, r"test_size must be in \(0, 1\)"),
        ({"benign_set": "useful"}, "contrasts harmful_set='harmful' with benign_set='useful'"),
    ],
)
def test_callback_rejects_bad_arguments(kwargs, message):
    with pytest.raises(MisconfigurationException, match=message):
        ActivationRecorder(**kwargs)


def _setup(callback, module, tmp_path):
    from lightning.pytorch import Trainer

    trainer = Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, enable_checkpointing=False)
    callback.setup(trainer, module, "fit")


def test_setup_rejects_layer_out_of_range(tiny_lm, prompt_files, tmp_path):
    sets, _, _ = prompt_files
    with pytest.raises(MisconfigurationException, match="model has 2 layers"):
        _setup(ActivationRecorder(layers=[2], prompt_sets=sets), tiny_lm(), tmp_path)


def test_setup_rejects_empty_prompt_set(tiny_lm, prompt_files, tmp_path):
    sets, _, _ = prompt_files
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(MisconfigurationException, match=r"prompt set 'benign'.*is empty"):
        _setup(ActivationRecorder(prompt_sets={**sets, "benign": str(empty)}), tiny_lm(), tmp_path)


def test_setup_rejects_sets_too_small_for_the_held_out_probe(tiny_lm, prompt_files, tmp_path):
    sets, _, _ = prompt_files
    recorder = ActivationRecorder(prompt_sets=sets, num_prompts=3, probe_test_size=0.75)
    with pytest.raises(MisconfigurationException, match=r"analyse=True: the probe holds out 0.75 .* got 3 harmful"):
        _setup(recorder, tiny_lm(), tmp_path)
    _setup(
        ActivationRecorder(prompt_sets=sets, num_prompts=3, probe_test_size=0.75, analyse=False), tiny_lm(), tmp_path
    )


def test_default_prompt_sets_are_harmful_and_benign_requests_of_one_form():
    recorder = ActivationRecorder()
    assert recorder.prompt_sets == {"harmful": "builtin:harmful-test", "benign": "builtin:benign-test"}
    assert (recorder.harmful_set, recorder.benign_set, recorder.options.num_prompts) == ("harmful", "benign", 128)


def test_setup_rejects_prompts_longer_than_the_context(tiny_lm, prompt_files, tmp_path):
    sets, _, _ = prompt_files
    module = tiny_lm()
    module.model.config.max_position_embeddings = 40
    with pytest.raises(
        MisconfigurationException, match=r"longer than the model's context \(max_position_embeddings=40\)"
    ):
        _setup(ActivationRecorder(prompt_sets=sets), module, tmp_path)


def test_setup_needs_model_and_tokenizer(tmp_path):
    import lightning as L

    with pytest.raises(MisconfigurationException, match=r"needs a LightningModule with \.model and \.tokenizer"):
        _setup(ActivationRecorder(), L.LightningModule(), tmp_path)


def test_state_dict_round_trip():
    a = ActivationRecorder()
    a.recorded_steps = [0, 5]
    b = ActivationRecorder()
    b.load_state_dict(a.state_dict())
    assert b.recorded_steps == [0, 5] and rec.ActivationRecorder().state_key == a.state_key


class CapturingWandb(WandbLogger):
    """A WandbLogger that keeps tables and images in memory instead of starting a W&B run."""

    def __init__(self):
        Logger.__init__(self)
        self.tables: dict[str, tuple] = {}
        self.images: dict[str, list] = {}

    name = "capture"
    version = "0"
    save_dir = None
    experiment = None

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        pass

    def log_table(self, key, columns=None, data=None, dataframe=None, step=None):
        self.tables[key] = (columns, data)

    def log_image(self, key, images, step=None, **kwargs):
        self.images[key] = images

    def finalize(self, status):
        pass


def test_trainer_run_writes_steps_analysis_and_logs(tiny_lm, prompt_files, tmp_path):
    sets, _, _ = prompt_files
    module = tiny_lm(layers=2)
    recorder = ActivationRecorder(
        out_dir=str(tmp_path / "acts"),
        prompt_sets=sets,
        num_prompts=6,
        every_n_steps=2,
        batch_size=4,
        shard_size=4,
        etas=[0.5, 0.9],
    )
    logger = CapturingWandb()
    trainer = Trainer(
        max_steps=4,
        accumulate_grad_batches=2,
        logger=logger,
        callbacks=[recorder],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
    )
    trainer.fit(module)

    acts = tmp_path / "acts"
    assert recorder.recorded_steps == [0, 2, 4]
    assert recorded_steps(acts) == [0, 2, 4]
    for step in (0, 2, 4):
        names = sorted(p.name for p in (acts / f"step_{step}").iterdir())
        # default layers of a 2-layer model: [1]; 6 prompts in shards of 4 rows
        assert names == [
            "benign_layer1_shard0.safetensors",
            "benign_layer1_shard1.safetensors",
            "harmful_layer1_shard0.safetensors",
            "harmful_layer1_shard1.safetensors",
            "manifest.json",
        ]
    before, _ = load_activations(acts, 0, "harmful", 1)
    after, _ = load_activations(acts, 4, "harmful", 1)
    assert before.shape == (6, 64) and not torch.allclose(before, after)  # training moved the activations
    # the recorder handed the model back in train mode, without hooks
    assert all(module.train_modes) and len(module.train_modes) == 8
    assert all(len(b._forward_hooks) == 0 for b in decoder_layers(module.model))

    analysis = json.loads((acts / "analysis.json").read_text())
    assert {(r["step"], r["layer"]) for r in analysis["layers"]} == {(0, 1), (2, 1), (4, 1)}
    assert {r["first_step"] for r in analysis["changes"]} == {0} and {r["last_step"] for r in analysis["changes"]} == {
        4
    }
    assert (acts / "mso_vs_eta.png").is_file() and (acts / "probe_by_layer.png").is_file()
    assert set(logger.tables) == {"activations/mso", "activations/layers", "activations/changes"}
    columns, data = logger.tables["activations/layers"]
    assert {"probe_accuracy", "probe_n_test", "probe_ci_low"} <= set(columns) and len(data) == 3
    assert {row[columns.index("probe_n_test")] for row in data} == {6}  # half of 6 + 6 prompts held out
    assert set(logger.images) == {"activations/mso_vs_eta", "activations/probe_by_layer"}


def test_resume_does_not_record_a_step_twice(tiny_lm, prompt_files, tmp_path):
    sets, _, _ = prompt_files
    recorder = ActivationRecorder(out_dir=str(tmp_path / "acts"), prompt_sets=sets, num_prompts=4, analyse=False)
    recorder.load_state_dict({"recorded_steps": [0]})
    trainer = Trainer(
        max_steps=1,
        logger=False,
        callbacks=[recorder],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(tiny_lm())
    assert recorded_steps(tmp_path / "acts") == [1]
    assert not (tmp_path / "acts" / "analysis.json").exists()


def test_default_out_dir_under_the_trainer_root(tiny_lm, prompt_files, tmp_path):
    sets, _, _ = prompt_files
    recorder = ActivationRecorder(prompt_sets=sets, num_prompts=4, layers=[0, 1.0], position="assistant", etas=[0.5])
    trainer = Trainer(
        max_steps=1,
        logger=False,
        callbacks=[recorder],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(tiny_lm())
    assert recorded_steps(tmp_path / "activations") == [0, 1]
    manifest = json.loads((tmp_path / "activations" / "step_1" / "manifest.json").read_text())
    assert manifest["layers"] == [0, 1] and manifest["position"] == "assistant"
