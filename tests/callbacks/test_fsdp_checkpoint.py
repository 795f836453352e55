"""FSDP2 checkpoints: the Hugging Face checkpoint is gathered one tensor at a time, and a killed run resumed
from Lightning's distributed checkpoint ends where an uninterrupted one does (two gloo processes)."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers.fsdp_checkpoint_worker import KILLED
from helpers.projection import TinyLM, random_basis
from helpers.ranks import run_helper
from safeproj.core.tensor_files import SafetensorsFiles


def _launch(out: Path, phase: str) -> int:
    result = run_helper("fsdp_checkpoint_worker.py", str(out), phase, timeout=300)
    assert result.returncode in (0, KILLED), result.stderr[-3000:]
    return result.returncode


def _read(folder: Path) -> dict[str, torch.Tensor]:
    files = SafetensorsFiles(folder)
    return {name: files.read(name) for name in files.file_of}


@pytest.mark.slow
def test_fsdp_checkpoints_gathered_per_tensor_and_resumed_runs_end_alike(tmp_path):
    random_basis(TinyLM().model, tmp_path / "b.safetensors", frac=0.5)
    whole, run = tmp_path / "whole", tmp_path / "run"
    whole.mkdir()
    run.mkdir()
    assert _launch(whole, "whole") == 0
    ranks = [torch.load(whole / f"rank{r}.pt") for r in range(2)]
    weights = ranks[0]["weights"]

    # Rank zero never held more than one whole tensor: the gathers went one at a time, in several files.
    for rank in ranks:
        assert rank["calls"] >= 2 * len(weights) and 0 < rank["peak"] <= rank["largest"]
    checkpoint = whole / "checkpoint"
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert sorted(p.name for p in checkpoint.glob("*.safetensors")) == sorted(set(index["weight_map"].values()))

    # The files hold the gathered weights, read by safeproj's reader and by transformers alike.
    saved = _read(checkpoint)
    assert saved.keys() == weights.keys() and all(torch.equal(saved[n], weights[n]) for n in weights)
    loaded = AutoModelForCausalLM.from_pretrained(checkpoint).state_dict()
    assert all(torch.equal(loaded[n], weights[n]) for n in weights)
    start = TinyLM().model.state_dict()
    initial = _read(whole / "initial")
    assert initial.keys() == start.keys() and all(torch.equal(initial[n], start[n]) for n in start)
    assert json.loads((checkpoint / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert (checkpoint / "safeproj.json").is_file() and (checkpoint / "tokenizer_config.json").is_file()

    # Killed after the checkpoint of step 2, resumed from `last`: the same end as the whole run.
    assert _launch(run, "killed") == KILLED
    assert not (run / "checkpoint").exists() and (run / "ckpts" / "last.ckpt").is_dir()
    assert _launch(run, "resumed") == 0
    resumed = torch.load(run / "rank0.pt")["weights"]
    for name, want in weights.items():
        assert torch.equal(resumed[name], want), name  # W₀ is read from initial/ on disk: bit for bit
    final = _read(run / "checkpoint")
    assert final.keys() == resumed.keys() and all(torch.equal(final[n], resumed[n]) for n in final)
