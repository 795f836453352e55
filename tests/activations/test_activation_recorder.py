"""Recording: values equal the model's hidden states, hooks are cleaned up, shards stay bounded."""

from __future__ import annotations

import json
import math

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from safetensors import safe_open

from safeproj.core.activations import load_activations
from safeproj.callbacks import activation_recorder as rec
from safeproj.callbacks.activation_recorder import (
    ActivationRecorder,
    ShardWriter,
    decoder_layers,
    encode_prompts,
    left_pad,
    load_prompt_set,
    prepare_prompt_sets,
    record_activations,
    record_step,
    resolve_layers,
    select_rows,
)
from safeproj.data.templates import format_prompt
from safeproj.model.loading import tiny_model

PROMPTS = ["hi", "what is 12 + 30?", "tell me how to pick a lock on a door", "ok!", "seven times six"]


def expected_positions(tokenizer, prompt: str, position: str) -> list[int]:
    """Positions worked out independently of the recorder (the tiny tokenizer is one token per character)."""
    text = format_prompt(tokenizer, prompt)
    n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert n == len(text)
    if position == "last":
        return [n - 1]
    if position == "mean":
        return list(range(n))
    messages = [{"role": "user", "content": prompt}]
    bare = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    suffix = text[len(bare):] if text.startswith(bare) else "### Response:\n"
    assert suffix and text.endswith(suffix)
    return list(range(n - len(suffix), n))


@pytest.mark.parametrize("position", ["last", "mean", "assistant"])
def test_recorded_rows_equal_hidden_states(tmp_path, position):
    model, tok = tiny_model(seed=1, layers=4)
    layers = [0, 2]
    encoded = {"mixed": encode_prompts(tok, PROMPTS, position)}
    lengths = [len(e.ids) for e in encoded["mixed"]]
    assert len(set(lengths)) == len(PROMPTS)  # batches really mix lengths
    record_step(model, encoded, layers, tmp_path, 7, position=position, pad_id=tok.pad_token_id, batch_size=3, progress=False)

    # Reference 1: each prompt alone, no padding.
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([e.ids]), output_hidden_states=True).hidden_states for e in encoded["mixed"]]
    # Reference 2: one left-padded batch through the full model.
    batch = left_pad(encoded["mixed"], tok.pad_token_id)
    with torch.no_grad():
        padded = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids, output_hidden_states=True).hidden_states
    width = batch.input_ids.shape[1]
    for layer in layers:
        rows, ids = load_activations(tmp_path, 7, "mixed", layer)
        assert ids == list(range(len(PROMPTS)))
        for i, prompt in enumerate(PROMPTS):
            pos = expected_positions(tok, prompt, position)
            want = alone[i][layer + 1][0, pos].mean(0)
            torch.testing.assert_close(rows[i], want, atol=2e-5, rtol=1e-4)
            shift = width - lengths[i]
            torch.testing.assert_close(rows[i], padded[layer + 1][i, [shift + p for p in pos]].mean(0), atol=2e-5, rtol=1e-4)


def test_last_layer_is_the_layer_output_before_the_final_norm(tmp_path):
    model, tok = tiny_model(seed=2, layers=2)
    encoded = {"s": encode_prompts(tok, PROMPTS[:3], "last")}
    record_step(model, encoded, [1], tmp_path, 0, position="last", pad_id=tok.pad_token_id, progress=False)
    rows, _ = load_activations(tmp_path, 0, "s", 1)
    with torch.no_grad():
        for i, e in enumerate(encoded["s"]):
            final = model(input_ids=torch.tensor([e.ids]), output_hidden_states=True).hidden_states[-1][0, -1]
            torch.testing.assert_close(model.model.norm(rows[i]), final, atol=2e-5, rtol=1e-4)


def test_pad_positions_are_never_read():
    model, tok = tiny_model(layers=2)
    batch = left_pad(encode_prompts(tok, ["a", "a much longer prompt"], "mean"), tok.pad_token_id)
    hidden = torch.randn(*batch.input_ids.shape, 8)
    hidden[batch.attention_mask == 0] = float("nan")
    out = select_rows(hidden, batch)
    assert torch.isfinite(out).all()
    real = batch.attention_mask[0].bool()
    torch.testing.assert_close(out[0], hidden[0, real].mean(0))


def test_hooks_removed_and_modes_restored_after_an_error():
    model, tok = tiny_model(layers=3)
    model.train()
    model.model.layers[1].eval()  # a deliberately frozen submodule keeps its own flag
    blocks = decoder_layers(model)
    before = [len(b._forward_hooks) for b in blocks]
    batch = left_pad(encode_prompts(tok, PROMPTS[:2], "last"), tok.pad_token_id)
    with pytest.raises(RuntimeError, match="boom"):
        with record_activations(model, [0, 2]) as capture:
            assert not model.training and not torch.is_grad_enabled()
            assert len(blocks[0]._forward_hooks) == before[0] + 1
            rows = capture(batch)
            assert set(rows) == {0, 2} and rows[0].device.type == "cpu"
            raise RuntimeError("boom")
    assert [len(b._forward_hooks) for b in blocks] == before
    assert model.training and not model.model.layers[1].training and model.model.layers[0].training
    assert torch.is_grad_enabled()


def test_error_mid_recording_leaves_no_hooks_and_no_partial_step(tmp_path, monkeypatch):
    model, tok = tiny_model(layers=2)
    encoded = {"s": encode_prompts(tok, PROMPTS, "last")}
    calls = {"n": 0}
    real_add = ShardWriter.add

    def failing_add(self, rows, ids):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        real_add(self, rows, ids)

    monkeypatch.setattr(ShardWriter, "add", failing_add)
    with pytest.raises(OSError, match="disk full"):
        record_step(model, encoded, [0, 1], tmp_path, 3, position="last", pad_id=0, batch_size=2, progress=False)
    assert all(len(b._forward_hooks) == 0 for b in decoder_layers(model))
    assert list(tmp_path.iterdir()) == []  # neither step_3 nor its hidden work folder


def test_rows_recorded_as_copies_not_views():
    model, tok = tiny_model(layers=2)
    batch = left_pad(encode_prompts(tok, PROMPTS[:2], "last"), tok.pad_token_id)
    with record_activations(model, [0]) as capture:
        first = capture(batch)[0]
        snapshot = first.clone()
        capture(left_pad(encode_prompts(tok, PROMPTS[2:4], "last"), tok.pad_token_id))
    # Its own compact storage: not a view into the (B, T, d) hidden-state buffer.
    assert first.untyped_storage().nbytes() == first.numel() * first.element_size()
    torch.testing.assert_close(first, snapshot)


def test_shards_flush_and_memory_stays_bounded(tmp_path):
    model, tok = tiny_model(layers=2)
    prompts = [f"prompt number {i}" + "!" * i for i in range(10)]
    encoded = {"s": encode_prompts(tok, prompts, "last")}
    small = record_step(model, encoded, [0, 1], tmp_path / "small", 0, position="last", pad_id=0,
                        batch_size=4, shard_size=3, progress=False)
    big = record_step(model, encoded, [0, 1], tmp_path / "big", 0, position="last", pad_id=0,
                      batch_size=4, shard_size=1000, progress=False)
    files = sorted(p.name for p in (tmp_path / "small" / "step_0").glob("s_layer0_shard*.safetensors"))
    assert len(files) == math.ceil(10 / 3) == 4
    assert small.max_buffered_rows <= 3 < big.max_buffered_rows
    assert small.shards == 8 and big.shards == 2
    for layer in (0, 1):
        a, ids = load_activations(tmp_path / "small", 0, "s", layer)
        b, _ = load_activations(tmp_path / "big", 0, "s", layer)
        assert ids == list(range(10))
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    with safe_open(str(tmp_path / "small" / "step_0" / "s_layer1_shard1.safetensors"), framework="pt") as f:
        meta = f.metadata()
        assert f.get_tensor("activations").shape == (3, 64)
    assert meta["step"] == "0" and meta["layer"] == "1" and meta["position"] == "last" and meta["dtype"] == "float32"
    assert json.loads(meta["prompt_ids"]) == [3, 4, 5]
    manifest = json.loads((tmp_path / "small" / "step_0" / "manifest.json").read_text())
    assert manifest["sets"] == {"s": 10} and manifest["layers"] == [0, 1]
    # payload = prompts × layers × hidden × 4 bytes; the files add only small safetensors headers
    assert small.payload_bytes == 10 * 2 * 64 * 4
    assert small.payload_bytes < small.bytes_written < small.payload_bytes + 8 * 600


def test_bfloat16_storage(tmp_path):
    model, tok = tiny_model(layers=2)
    encoded = {"s": encode_prompts(tok, PROMPTS, "last")}
    r32 = record_step(model, encoded, [1], tmp_path / "f32", 0, position="last", pad_id=0, progress=False)
    r16 = record_step(model, encoded, [1], tmp_path / "bf16", 0, position="last", pad_id=0, dtype="bfloat16", progress=False)
    with safe_open(str(tmp_path / "bf16" / "step_0" / "s_layer1_shard0.safetensors"), framework="pt") as f:
        assert f.get_tensor("activations").dtype == torch.bfloat16
    a, _ = load_activations(tmp_path / "f32", 0, "s", 1)
    b, _ = load_activations(tmp_path / "bf16", 0, "s", 1)
    torch.testing.assert_close(b, a, rtol=1e-2, atol=1e-2)
    assert r16.payload_bytes * 2 == r32.payload_bytes


def test_resolve_layers():
    assert resolve_layers(None, 30) == list(range(19, 27))  # 65–90 % of depth
    assert resolve_layers(None, 2) == [1]
    assert resolve_layers(None, 1) == [0]
    assert resolve_layers([0.0, 1.0, 0.5, 3], 5) == [0, 2, 3, 4]
    with pytest.raises(ValueError, match="out of range: the model has 4 layers"):
        resolve_layers([4], 4)
    with pytest.raises(ValueError, match="outside"):
        resolve_layers([1.5], 4)
    with pytest.raises(ValueError, match="int indices or float shares"):
        resolve_layers([True], 4)


def test_load_prompt_set_files(prompt_files, tmp_path):
    sets, harmful, useful = prompt_files
    assert load_prompt_set(sets["harmful"], 3) == harmful[:3]  # jsonl, field "goal"
    assert load_prompt_set(sets["useful"], 100) == useful  # csv, field "instruction"
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"prompt": "a", "text": "x"}, {"prompt": "b", "text": "y"}]))
    assert load_prompt_set(str(path), 5) == ["a", "b"]
    assert load_prompt_set(f"{path}#text", 5) == ["x", "y"]
    with pytest.raises(ValueError, match="no field missing"):
        load_prompt_set(f"{path}#missing", 5)
    with pytest.raises(ValueError, match="not found"):
        load_prompt_set(str(tmp_path / "nope.jsonl"), 5)
    with pytest.raises(ValueError, match="unknown prompt set"):
        load_prompt_set("nonsense", 5)
    with pytest.raises(ValueError, match="unknown built-in prompt set 'builtin:funny-test'"):
        load_prompt_set("builtin:funny-test", 5)


def test_builtin_prompt_sets():
    from safeproj.data import synthetic

    harmful = load_prompt_set("builtin:harmful-test", 6, seed=0)
    useful = load_prompt_set("builtin:useful-test", 6, seed=0)
    assert harmful == [r["prompt"] for r in synthetic.harmful_requests(6, 0, split="test")]
    assert useful == [r["prompt"] for r in synthetic.arithmetic(6, 0, split="test")]
    assert load_prompt_set("builtin:harmful-test", 6, seed=1) != harmful
    # a request beyond a finite generator's size gives all it has rather than failing
    capacity = synthetic.builtin_capacity("builtin:harmful-test")
    assert len(load_prompt_set("builtin:harmful-test", capacity + 5)) == capacity


# ------------------------------------------------------------------ callback arguments and setup


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
        ({"etas": [0.0]}, "etas must be"),
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
    with pytest.raises(MisconfigurationException, match="prompt set 'useful'.*is empty"):
        _setup(ActivationRecorder(prompt_sets={**sets, "useful": str(empty)}), tiny_lm(), tmp_path)


def test_setup_rejects_prompts_longer_than_the_context(tiny_lm, prompt_files, tmp_path):
    sets, _, _ = prompt_files
    module = tiny_lm()
    module.model.config.max_position_embeddings = 40
    with pytest.raises(MisconfigurationException, match=r"longer than the model's context \(max_position_embeddings=40\)"):
        _setup(ActivationRecorder(prompt_sets=sets), module, tmp_path)


def test_setup_needs_model_and_tokenizer(tmp_path):
    import lightning as L

    with pytest.raises(MisconfigurationException, match="needs a LightningModule with .model and .tokenizer"):
        _setup(ActivationRecorder(), L.LightningModule(), tmp_path)


def test_prepare_prompt_sets_checks_lengths_with_plain_errors(prompt_files):
    _, tok = tiny_model()
    sets, harmful, _ = prompt_files
    lengths = [len(e.ids) for e in encode_prompts(tok, harmful[:3], "last")]
    assert max(lengths[:2]) < lengths[2]
    with pytest.raises(ValueError, match=f"prompt 2 of set 'harmful' has {lengths[2]} tokens"):
        prepare_prompt_sets(tok, {"harmful": sets["harmful"]}, 8, "last", max_length=lengths[2] - 1)
    assert len(prepare_prompt_sets(tok, {"harmful": sets["harmful"]}, 2, "last", max_length=lengths[2] - 1)["harmful"]) == 2


def test_state_dict_round_trip():
    a = ActivationRecorder()
    a.recorded_steps = [0, 5]
    b = ActivationRecorder()
    b.load_state_dict(a.state_dict())
    assert b.recorded_steps == [0, 5] and rec.ActivationRecorder().state_key == a.state_key


def test_peft_wrapped_model_is_recorded_through_its_adapters(tmp_path):
    from peft import LoraConfig, get_peft_model

    model, tok = tiny_model(seed=4, layers=3)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj", "down_proj"]))
    with torch.no_grad():  # B starts at zero; make the adapters change the output
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    assert len(decoder_layers(peft_model)) == 3
    encoded = {"s": encode_prompts(tok, PROMPTS[:3], "last")}
    record_step(peft_model, encoded, [1], tmp_path, 0, position="last", pad_id=0, progress=False)
    rows, _ = load_activations(tmp_path, 0, "s", 1)
    with torch.no_grad():
        for i, e in enumerate(encoded["s"]):
            with_lora = peft_model(input_ids=torch.tensor([e.ids]), output_hidden_states=True).hidden_states[2][0, -1]
            torch.testing.assert_close(rows[i], with_lora, atol=2e-5, rtol=1e-4)
            with peft_model.disable_adapter():
                without = peft_model(input_ids=torch.tensor([e.ids]), output_hidden_states=True).hidden_states[2][0, -1]
            assert not torch.allclose(rows[i], without, atol=1e-3)
