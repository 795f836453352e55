"""The streamed Hugging Face checkpoint (what FSDP2 runs write tensor by tensor) in one process: the same
weights and config as `save_pretrained`, tied heads once, several files with an index, nothing on failure."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from safeproj.core.tensor_files import SafetensorsFiles
from safeproj.model import hf_checkpoint
from safeproj.model.hf_checkpoint import hf_entries, save_gathered_checkpoint
from safeproj.model.loading import tiny_model


def _state(folder):
    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


@pytest.mark.parametrize("max_bytes", [2**30, 64 * 2**10])
def test_streamed_checkpoint_loads_as_save_pretrained_writes_it(tmp_path, monkeypatch, max_bytes):
    monkeypatch.setattr(hf_checkpoint, "MAX_SHARD_BYTES", max_bytes)
    model, tok = tiny_model()
    model.to(torch.bfloat16)  # a dtype numpy has no name for: written as raw bytes all the same
    save_gathered_checkpoint(model, tok, tmp_path / "streamed", is_writer=True, manifest={"k": 1})
    model.save_pretrained(tmp_path / "reference")
    streamed, reference = _state(tmp_path / "streamed"), _state(tmp_path / "reference")
    assert streamed.keys() == reference.keys() and all(torch.equal(streamed[n], reference[n]) for n in reference)
    config = json.loads((tmp_path / "streamed" / "config.json").read_text())
    assert config == json.loads((tmp_path / "reference" / "config.json").read_text())
    files = SafetensorsFiles(tmp_path / "streamed")
    assert all(torch.equal(files.read(n), t) for n, t in model.state_dict().items())
    index = tmp_path / "streamed" / "model.safetensors.index.json"
    assert index.is_file() == (max_bytes < 2**30)
    assert json.loads((tmp_path / "streamed" / "safeproj.json").read_text()) == {"k": 1}
    with safe_open(str(next((tmp_path / "streamed").glob("*.safetensors"))), "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_a_tied_head_is_written_once_and_tied_again_on_load(tmp_path):
    small, tok = tiny_model()
    config = small.config
    config.tie_word_embeddings = True
    model = LlamaForCausalLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "lm_head.weight" not in [e.name for e in hf_entries(model)]
    save_gathered_checkpoint(model, tok, tmp_path / "tied", is_writer=True)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "tied")
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    model, tok = tiny_model()

    def full_disk(tensor):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hf_checkpoint, "_raw_bytes", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_gathered_checkpoint(model, tok, tmp_path / "checkpoint", is_writer=True)
    assert list(tmp_path.iterdir()) == []
