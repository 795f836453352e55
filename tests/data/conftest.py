"""Tokenizers built in code for the data tests: Alpaca-style, ChatML with and without control tokens."""

import pytest

from safeproj.model.loading import tiny_tokenizer

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture
def tiny_tok():
    return tiny_tokenizer()


@pytest.fixture
def chatml_tok():
    """ChatML whose end-of-turn marker is a single control token that is also eos (as in SmolLM2)."""
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = "<|im_end|>"
    tok.chat_template = CHATML
    return tok


@pytest.fixture
def chatml_plain_tok():
    """ChatML on the character tokenizer: the end-of-turn marker is ten ordinary tokens, not eos."""
    tok = tiny_tokenizer()
    tok.chat_template = CHATML
    return tok
