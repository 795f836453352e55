"""Recording with hooks: values equal the model's hidden states, pads are never read, hooks are cleaned up."""

from __future__ import annotations

import pytest
import torch

from safeproj.data.templates import format_prompt
from safeproj.model.activations import (
    decoder_layers,
    encode_prompts,
    left_pad,
    prepare_prompt_sets,
    record_activations,
    resolve_layers,
    select_rows,
)
from safeproj.model.loading import tiny_model
from safeproj.model.recordings import load_activations, record_step

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
    suffix = text[len(bare) :] if text.startswith(bare) else "### Response:\n"
    assert suffix and text.endswith(suffix)
    return list(range(n - len(suffix), n))


@pytest.mark.parametrize("position", ["last", "mean", "assistant"])
def test_recorded_rows_equal_hidden_states(tmp_path, position):
    model, tok = tiny_model(seed=1, layers=4)
    layers = [0, 2]
    encoded = {"mixed": encode_prompts(tok, PROMPTS, position)}
    lengths = [len(e.ids) for e in encoded["mixed"]]
    assert len(set(lengths)) == len(PROMPTS)  # batches really mix lengths
    record_step(
        model, encoded, layers, tmp_path, 7, position=position, pad_id=tok.pad_token_id, batch_size=3, progress=False
    )

    # Reference 1: each prompt alone, no padding.
    with torch.no_grad():
        alone = [
            model(input_ids=torch.tensor([e.ids]), output_hidden_states=True).hidden_states for e in encoded["mixed"]
        ]
    # Reference 2: one left-padded batch through the full model.
    batch = left_pad(encoded["mixed"], tok.pad_token_id)
    with torch.no_grad():
        padded = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            output_hidden_states=True,
        ).hidden_states
    width = batch.input_ids.shape[1]
    for layer in layers:
        rows, ids = load_activations(tmp_path, 7, "mixed", layer)
        assert ids == list(range(len(PROMPTS)))
        for i, prompt in enumerate(PROMPTS):
            pos = expected_positions(tok, prompt, position)
            want = alone[i][layer + 1][0, pos].mean(0)
            torch.testing.assert_close(rows[i], want, atol=2e-5, rtol=1e-4)
            shift = width - lengths[i]
            torch.testing.assert_close(
                rows[i], padded[layer + 1][i, [shift + p for p in pos]].mean(0), atol=2e-5, rtol=1e-4
            )


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
    _, tok = tiny_model(layers=2)
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
    with pytest.raises(RuntimeError, match="boom"), record_activations(model, [0, 2]) as capture:
        assert not model.training and not torch.is_grad_enabled()
        assert len(blocks[0]._forward_hooks) == before[0] + 1
        rows = capture(batch)
        assert set(rows) == {0, 2} and rows[0].device.type == "cpu"
        raise RuntimeError("boom")
    assert [len(b._forward_hooks) for b in blocks] == before
    assert model.training and not model.model.layers[1].training and model.model.layers[0].training
    assert torch.is_grad_enabled()


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


def test_prepare_prompt_sets_checks_lengths_with_plain_errors(prompt_files):
    _, tok = tiny_model()
    sets, harmful, _ = prompt_files
    lengths = [len(e.ids) for e in encode_prompts(tok, harmful[:3], "last")]
    assert max(lengths[:2]) < lengths[2]
    with pytest.raises(ValueError, match=f"prompt 2 of set 'harmful' has {lengths[2]} tokens"):
        prepare_prompt_sets(tok, {"harmful": sets["harmful"]}, 8, "last", max_length=lengths[2] - 1)
    assert (
        len(prepare_prompt_sets(tok, {"harmful": sets["harmful"]}, 2, "last", max_length=lengths[2] - 1)["harmful"])
        == 2
    )


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


@pytest.mark.parametrize("position", ["last", "mean", "assistant"])
def test_recorded_prompt_tokens_are_the_training_prompt_tokens(position):
    from safeproj.data.templates import IGNORE_INDEX, format_example

    _, tok = tiny_model()
    for prompt, encoded in zip(PROMPTS, encode_prompts(tok, PROMPTS, position)):
        example = format_example(tok, prompt, "an answer", max_length=512)
        assert list(encoded.ids) == [
            t for t, label in zip(example["input_ids"], example["labels"]) if label == IGNORE_INDEX
        ]
