"""`safeproj activations`: record, analyse and print; with a basis; a base model against a tuned checkpoint."""

from __future__ import annotations

import pytest
import torch

from safeproj.commands.activations import activations_command


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
    assert "probe" in printed and "mso@0.5" in printed and "n_test" in printed
    assert {r["probe_n_test"] for r in report["layers"]} == {8}  # half of 8 + 8 prompts
    with pytest.raises(ValueError, match="'useful' is not among prompt_sets"):
        activations_command("tiny", out_dir=str(out), prompt_sets=sets, benign_set="useful")
    with pytest.raises(ValueError, match="test_size must be in"):
        activations_command("tiny", out_dir=str(out), prompt_sets=sets, probe_test_size=0.0)
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


def test_built_in_sets_are_probed_on_held_out_acts(tmp_path):
    # The built-in requests record the act each prompt is made from; the probe never tests on a trained act.
    import json

    out = tmp_path / "acts"
    report = activations_command("tiny", out_dir=str(out), layers=[1], num_prompts=24, etas=[0.5])
    manifest = json.loads((out / "step_0" / "manifest.json").read_text())
    assert set(manifest["groups"]) == {"harmful", "benign"} and len(manifest["groups"]["harmful"]) == 24
    (row,) = report["layers"]
    assert row["probe_test_groups"] >= 4  # at least two acts of each set held out whole

    # A recording without groups (made by an older version) takes them from the prompt sets on re-analysis.
    del manifest["groups"]
    (out / "step_0" / "manifest.json").write_text(json.dumps(manifest))
    again = activations_command("tiny", out_dir=str(out), num_prompts=24, etas=[0.5], record=False)
    assert again["layers"][0]["probe_test_groups"] == row["probe_test_groups"]
    assert again["layers"][0]["probe_accuracy"] == row["probe_accuracy"]
