"""A short Trainer run with ActivationRecorder, and the standalone command."""

from __future__ import annotations

import json

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import Logger, WandbLogger

from safeproj.core.activations import load_activations, recorded_steps
from safeproj.commands.activations import activations_command
from safeproj.callbacks.activation_recorder import ActivationRecorder, decoder_layers


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
        out_dir=str(tmp_path / "acts"), prompt_sets=sets, num_prompts=6, every_n_steps=2, batch_size=4,
        shard_size=4, etas=[0.5, 0.9],
    )
    logger = CapturingWandb()
    trainer = Trainer(
        max_steps=4, accumulate_grad_batches=2, logger=logger, callbacks=[recorder], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu",
    )
    trainer.fit(module)

    acts = tmp_path / "acts"
    assert recorder.recorded_steps == [0, 2, 4]
    assert recorded_steps(acts) == [0, 2, 4]
    for step in (0, 2, 4):
        names = sorted(p.name for p in (acts / f"step_{step}").iterdir())
        # default layers of a 2-layer model: [1]; 6 prompts in shards of 4 rows
        assert names == ["harmful_layer1_shard0.safetensors", "harmful_layer1_shard1.safetensors", "manifest.json",
                         "useful_layer1_shard0.safetensors", "useful_layer1_shard1.safetensors"]
    before, _ = load_activations(acts, 0, "harmful", 1)
    after, _ = load_activations(acts, 4, "harmful", 1)
    assert before.shape == (6, 64) and not torch.allclose(before, after)  # training moved the activations
    # the recorder handed the model back in train mode, without hooks
    assert all(module.train_modes) and len(module.train_modes) == 8
    assert all(len(b._forward_hooks) == 0 for b in decoder_layers(module.model))

    analysis = json.loads((acts / "analysis.json").read_text())
    assert {(r["step"], r["layer"]) for r in analysis["layers"]} == {(0, 1), (2, 1), (4, 1)}
    assert {r["first_step"] for r in analysis["changes"]} == {0} and {r["last_step"] for r in analysis["changes"]} == {4}
    assert (acts / "mso_vs_eta.png").is_file() and (acts / "probe_by_layer.png").is_file()
    assert set(logger.tables) == {"activations/mso", "activations/layers", "activations/changes"}
    columns, data = logger.tables["activations/layers"]
    assert "probe_accuracy" in columns and len(data) == 3
    assert set(logger.images) == {"activations/mso_vs_eta", "activations/probe_by_layer"}


def test_resume_does_not_record_a_step_twice(tiny_lm, prompt_files, tmp_path):
    sets, _, _ = prompt_files
    recorder = ActivationRecorder(out_dir=str(tmp_path / "acts"), prompt_sets=sets, num_prompts=4, analyse=False)
    recorder.load_state_dict({"recorded_steps": [0]})
    trainer = Trainer(max_steps=1, logger=False, callbacks=[recorder], enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(tiny_lm())
    assert recorded_steps(tmp_path / "acts") == [1]
    assert not (tmp_path / "acts" / "analysis.json").exists()


def test_default_out_dir_under_the_trainer_root(tiny_lm, prompt_files, tmp_path):
    sets, _, _ = prompt_files
    recorder = ActivationRecorder(prompt_sets=sets, num_prompts=4, layers=[0, 1.0], position="assistant", etas=[0.5])
    trainer = Trainer(max_steps=1, logger=False, callbacks=[recorder], enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(tiny_lm())
    assert recorded_steps(tmp_path / "activations") == [0, 1]
    manifest = json.loads((tmp_path / "activations" / "step_1" / "manifest.json").read_text())
    assert manifest["layers"] == [0, 1] and manifest["position"] == "assistant"


def test_command_records_analyses_and_prints(prompt_files, tmp_path, capsys):
    sets, _, _ = prompt_files
    out = tmp_path / "cmd"
    report = activations_command(
        "tiny", out_dir=str(out), layers=[0, 1], prompt_sets=sets, num_prompts=8, position="mean", etas=[0.5, 0.9]
    )
    assert len(report["mso"]) == 2 * 2 * 2 and len(report["layers"]) == 2
    for name in ("analysis.json", "mso_vs_eta.png", "probe_by_layer.png", "step_0/manifest.json"):
        assert (out / name).is_file()
    printed = capsys.readouterr().out
    assert "probe" in printed and "mso@0.5" in printed
    with pytest.raises(ValueError, match="position must be one of"):
        activations_command("tiny", out_dir=str(out), position="first")
    with pytest.raises(ValueError, match="out of range: the model has 2 layers"):
        activations_command("tiny", out_dir=str(out), prompt_sets=sets, layers=[5])


def test_command_with_a_basis_artifact(prompt_files, tmp_path):
    from safeproj.core.basis import Basis, build_basis
    from safeproj.model.loading import tiny_model

    sets, _, _ = prompt_files
    model, _ = tiny_model()
    params = dict(model.named_parameters())
    names = ["model.layers.1.self_attn.o_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    basis = build_basis(((n, params[n].detach()) for n in names), frac=0.25, side="left", progress=False)
    path = tmp_path / "basis.safetensors"
    basis.save(path)
    report = activations_command(
        "tiny", out_dir=str(tmp_path / "cmd"), layers=[1], prompt_sets=sets, num_prompts=8, basis=str(path), etas=[0.5]
    )
    row = report["layers"][0]
    assert 0.0 <= row["cos_o_proj"] <= 1.0 and 0.0 <= row["cos_down_proj"] <= 1.0
    assert row["random_o_proj"] == pytest.approx((16 / 64) ** 0.5)
    assert isinstance(Basis.load(path), Basis)


def test_command_compares_a_base_model_with_a_tuned_checkpoint(prompt_files, tmp_path, capsys):
    from safeproj.model.loading import tiny_model

    sets, _, _ = prompt_files
    out = tmp_path / "cmd"
    tuned, tok = tiny_model()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for p in tuned.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    tuned.save_pretrained(tmp_path / "tuned")
    tok.save_pretrained(tmp_path / "tuned")
    common = dict(out_dir=str(out), layers=[1], prompt_sets=sets, num_prompts=8, etas=[0.5])
    activations_command("tiny", step=0, **common)
    report = activations_command(str(tmp_path / "tuned"), step=10, **common)
    assert [r["step"] for r in report["layers"]] == [0, 10]
    cos = [r["direction_cosine_to_first"] for r in report["layers"]]
    assert cos[0] == pytest.approx(1.0, abs=1e-5) and cos[1] < 0.999
    assert {(r["first_step"], r["last_step"]) for r in report["changes"]} == {(0, 10)}
    again = activations_command("unused", record=False, **common)  # analysis only, no model loaded
    assert again["layers"] == report["layers"]
    with pytest.raises(ValueError, match="no complete recordings"):
        activations_command("unused", record=False, out_dir=str(tmp_path / "empty"))
