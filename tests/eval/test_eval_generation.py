"""Batched greedy generation: equal to one-by-one, left padding, stop strings, state restored."""

from __future__ import annotations

import pytest
import torch

from safeproj.data.templates import format_prompt
from safeproj.eval.generation import cut_at_stop, generate

QUESTIONS = ["hi", "What is 12 + 30?", "Tell me a long story about a cat who sails the sea.", "x", "Why?"]


def unbatched(model, tok, prompt: str, max_new_tokens: int) -> str:
    """Reference: one prompt, no padding, plain HF greedy generation."""
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_batched_equals_one_by_one(tiny, batch_size):
    model, tok = tiny
    prompts = [format_prompt(tok, q) for q in QUESTIONS]
    got = generate(model, tok, prompts, max_new_tokens=12, batch_size=batch_size, progress=False)
    want = [unbatched(model, tok, p, 12) for p in prompts]
    assert got == want
    assert len(set(want)) > 1  # the outputs depend on the prompt, so order mix-ups would show
    assert not any(g.startswith("###") for g in got)  # continuation only, never the prompt


def test_right_padding_would_differ(tiny):
    # Guards the test above: with right padding the batched outputs change, so it can fail.
    model, tok = tiny
    prompts = [format_prompt(tok, q) for q in QUESTIONS]
    tok.padding_side = "right"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    right = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert right != [unbatched(model, tok, p, 12) for p in prompts]


def test_restores_padding_side_and_train_mode(tiny):
    model, tok = tiny
    tok.padding_side = "right"
    model.train()
    generate(model, tok, ["a", "bbb"], max_new_tokens=2, batch_size=2, progress=False)
    assert tok.padding_side == "right" and model.training
    model.eval()
    generate(model, tok, ["a"], max_new_tokens=2, progress=False)
    assert not model.training
    assert all(p.grad is None for p in model.parameters())


def test_stop_strings_cut_and_stop_early(tiny):
    model, tok = tiny
    prompts = [format_prompt(tok, q) for q in QUESTIONS[:3]]
    free = generate(model, tok, prompts, max_new_tokens=24, batch_size=3, progress=False)
    stop = free[0][6:8]  # a string the first output really produces
    stopped = generate(model, tok, prompts, max_new_tokens=24, batch_size=3, stop=[stop], progress=False)
    for full, cut in zip(free, stopped):
        assert cut == cut_at_stop(full, [stop])
        assert stop not in cut
    assert len(stopped[0]) < len(free[0])


def test_cut_at_stop():
    assert cut_at_stop("answer 4\nQuestion: next", ["Question:"]) == "answer 4\n"
    assert cut_at_stop("a STOP b END", ["END", "STOP"]) == "a "  # the earliest stop wins
    assert cut_at_stop("no stop here", ["Question:"]) == "no stop here"
    assert cut_at_stop("text", None) == "text"


def test_bad_arguments(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="list of strings"):
        generate(model, tok, "one prompt", progress=False)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, tok, ["a"], max_new_tokens=0, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        generate(model, tok, ["a"], batch_size=0, progress=False)
    with pytest.raises(ValueError, match="stop"):
        generate(model, tok, ["a"], stop=[""], progress=False)
    assert generate(model, tok, [], progress=False) == []


def test_evaluated_prompt_tokens_are_the_training_prompt_tokens(tiny, monkeypatch):
    """A tokenizer that adds BOS by itself, with a template that writes none: evaluation must feed the
    model the prompt tokens training masked, not a BOS-prefixed variant."""
    from tokenizers.processors import TemplateProcessing

    from safeproj.data.templates import IGNORE_INDEX, format_example

    model, tok = tiny
    tok._tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.bos_token_id)]
    )
    assert tok("a")["input_ids"][0] == tok.bos_token_id  # the tokenizer would add BOS on its own
    fed = []
    real_generate = model.generate

    def recording_generate(input_ids, attention_mask, **kwargs):
        fed.extend(ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask))
        return real_generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    monkeypatch.setattr(model, "generate", recording_generate)
    generate(model, tok, [format_prompt(tok, q) for q in QUESTIONS[:3]], max_new_tokens=2, batch_size=3, progress=False)
    for question, ids in zip(sorted(QUESTIONS[:3], key=len, reverse=True), fed):
        example = format_example(tok, question, "an answer", max_length=512)
        trained_prompt = [t for t, label in zip(example["input_ids"], example["labels"]) if label == IGNORE_INDEX]
        assert ids == trained_prompt
        assert ids[0] != tok.bos_token_id


def test_stop_strings_are_passed_to_transformers(tiny, monkeypatch):
    model, tok = tiny
    seen = {}
    real_generate = model.generate

    def recording_generate(**kwargs):
        seen.update(kwargs)
        return real_generate(**kwargs)

    monkeypatch.setattr(model, "generate", recording_generate)
    generate(model, tok, ["a"], max_new_tokens=2, stop=["\n\n", "Q:"], progress=False)
    assert seen["generation_config"].stop_strings == ["\n\n", "Q:"] and seen["tokenizer"] is tok
