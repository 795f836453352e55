import json

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from safeproj.model.loading import load_model, tiny_dir
from safeproj.model.module import LoraSettings, SafeprojLM
from safeproj.runs import run_manifest


def _batches(tok, n=8):
    texts = ["12+7=19", "3*4=12", "9-5=4", "8+8=16"]
    out = []
    for i in range(n):
        enc = tok([texts[(i + j) % 4] for j in range(2)], return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        out.append({**enc, "labels": labels})
    return out


class _Loader(torch.utils.data.IterableDataset):
    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def _fit(module, tmp_path, steps=30):
    batches = _batches(module.tokenizer, n=steps)
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    losses = []

    class Track(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer.callbacks.append(Track())
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(_Loader(batches), batch_size=None))
    return trainer, losses


def test_full_finetuning_loss_falls_and_checkpoint_round_trips(tmp_path):
    module = SafeprojLM(model="tiny", lr=3e-3, warmup_ratio=0.0)
    trainer, losses = _fit(module, tmp_path)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    ckpt = tmp_path / "checkpoint"
    manifest = run_manifest(ckpt)
    assert manifest["base"] == str(tiny_dir().resolve()) and manifest["lora"] is False
    assert manifest["global_step"] == 30
    saved = load_file(str(ckpt / "model.safetensors"))
    for name, p in module.model.state_dict().items():
        torch.testing.assert_close(saved[name], p)
    reloaded, tok = load_model(str(ckpt))
    batch = _batches(tok, 1)[0]
    module.model.eval()
    torch.testing.assert_close(reloaded(**batch).logits, module.model(**batch).logits)
    # Base weights are untouched by training: the run's update is readable as end − start.
    base = load_file(str(tiny_dir() / "model.safetensors"))
    assert not torch.equal(
        base["model.layers.0.self_attn.q_proj.weight"], saved["model.layers.0.self_attn.q_proj.weight"]
    )


def test_lora_trains_only_adapters_and_saves_an_adapter(tmp_path):
    module = SafeprojLM(model="tiny", lr=1e-2, warmup_ratio=0.0, lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    frozen = {n: p.detach().clone() for n, p in module.model.named_parameters() if not p.requires_grad}
    assert any("lora_B" in n for n, p in module.model.named_parameters() if p.requires_grad)
    trainer, losses = _fit(module, tmp_path, steps=20)
    assert losses[-1] < losses[0]
    for n, p in module.model.named_parameters():
        if n in frozen:
            assert torch.equal(frozen[n], p)
    ckpt = tmp_path / "checkpoint"
    assert (ckpt / "adapter_config.json").is_file()
    assert json.loads((ckpt / "safeproj.json").read_text())["lora"] is True


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="lora.r"):
        LoraSettings(r=0)
    with pytest.raises(ValueError, match="unknown model 'not-a-model'"):
        SafeprojLM(model="not-a-model")
    with pytest.raises(ValueError, match="cannot load hub model"):
        SafeprojLM(model="nobody/no-such-model-xyz")
