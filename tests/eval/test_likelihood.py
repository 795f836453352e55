"""Teacher-forced continuation log-likelihood: equal to a plain per-token loop, blind to padding and batching."""

from __future__ import annotations

import math

import pytest
import torch

from safeproj.data.templates import IGNORE_INDEX, format_example
from safeproj.eval.likelihood import continuation_logprobs, token_logprob_sums

# Different prompt and response lengths, so batches carry padding.
PAIRS = [
    ("What is 2 + 2?", "2 + 2 = 4\n#### 4"),
    ("Tell me a long story about a cat who learned to sail across the sea.", "Once upon a time, a cat sailed."),
    ("hi", "hello there, how can I help?"),
    ("A train goes 60 km in 1 hour. How far in 3 hours?", "60 * 3 = 180\n#### 180"),
    ("Why?", "Because."),
]


def plain_loop(model, tokenizer, prompt, response, max_length=1024):
    """log p(response | prompt) summed over the learned tokens, one unpadded sequence, one token at a time."""
    example = format_example(tokenizer, prompt, response, max_length)
    ids, labels = example["input_ids"], example["labels"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    total, count = 0.0, 0
    for t in range(1, len(ids)):
        if labels[t] != IGNORE_INDEX:
            total += torch.log_softmax(logits[t - 1].double(), dim=-1)[labels[t]].item()
            count += 1
    return total, count


def test_matches_a_plain_loop_over_gold_tokens(tiny):
    model, tokenizer = tiny
    sums, counts = continuation_logprobs(model, tokenizer, PAIRS, batch_size=3)
    for i, (prompt, response) in enumerate(PAIRS):
        total, count = plain_loop(model, tokenizer, prompt, response)
        assert counts[i] == count > len(response)  # the tiny tokenizer has one token per character, plus eos
        assert sums[i].item() == pytest.approx(total, rel=1e-5, abs=1e-4)


def test_batching_and_padding_do_not_change_any_item(tiny):
    model, tokenizer = tiny
    one_by_one = continuation_logprobs(model, tokenizer, PAIRS, batch_size=1)
    together = continuation_logprobs(model, tokenizer, PAIRS, batch_size=len(PAIRS))
    assert torch.equal(one_by_one[1], together[1])
    torch.testing.assert_close(one_by_one[0], together[0], rtol=1e-5, atol=1e-4)


def test_only_response_tokens_are_scored(tiny):
    model, tokenizer = tiny
    short, long = continuation_logprobs(model, tokenizer, [("Q", "abc"), ("Q" * 40, "abc")])[1]
    assert short == long  # a longer prompt adds no scored token


def test_token_sums_on_known_logits():
    vocab = 5
    logits = torch.zeros(2, 4, vocab)  # uniform: every token has log p = -log 5
    logits[1, 1, 3] = 50.0  # row 1 predicts token 3 at position 2 almost surely
    labels = torch.tensor([[IGNORE_INDEX, 1, 2, IGNORE_INDEX], [IGNORE_INDEX, IGNORE_INDEX, 3, 4]])
    sums, counts = token_logprob_sums(logits, labels)
    assert counts.tolist() == [2, 2]
    assert sums[0].item() == pytest.approx(-2 * math.log(vocab))
    assert sums[1].item() == pytest.approx(-math.log(vocab), abs=1e-6)


def test_model_gets_its_mode_back_and_bad_input_says_so(tiny):
    model, tokenizer = tiny
    model.train()
    continuation_logprobs(model, tokenizer, PAIRS[:2])
    assert model.training
    with pytest.raises(ValueError, match="max_length"):
        continuation_logprobs(model, tokenizer, [("a long prompt that fills the budget", "x")], max_length=8)
    with pytest.raises(ValueError, match="batch_size"):
        continuation_logprobs(model, tokenizer, PAIRS, batch_size=0)
    with pytest.raises(ValueError, match="differ"):
        token_logprob_sums(torch.zeros(1, 3, 5), torch.zeros(1, 4, dtype=torch.long))
