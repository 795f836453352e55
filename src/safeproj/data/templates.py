"""Prompt formatting shared by training, evaluation and activation recording.

Training examples and generation prompts go through the same chat template, so a model is evaluated
on exactly the format it was tuned on. Tokenizers without a chat template use the Alpaca-style
`CHAT_TEMPLATE` below.

Loss is on the response only: every prompt token (system text, user turn, the assistant marker of
the generation prompt) is labelled -100; the response and its end-of-turn token are learned.
"""

from __future__ import annotations

# Alpaca-style template for tokenizers without a chat template; kept in one place so data and
# evaluation format prompts identically.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}### Instruction:\n{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'assistant' %}### Response:\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}### Response:\n{% endif %}"
)


IGNORE_INDEX = -100  # label value that Hugging Face causal LMs leave out of the loss


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    template = None if getattr(tokenizer, "chat_template", None) else CHAT_TEMPLATE
    return tokenizer.apply_chat_template(
        messages, chat_template=template, add_generation_prompt=add_generation_prompt, tokenize=False
    )


def _training_text(tokenizer, prompt: str, response: str) -> tuple[str, int, bool]:
    """(text up to and including the end-of-turn marker, char index where the response starts,
    whether an eos id must still be appended because the template wrote no end marker)."""
    user = {"role": "user", "content": prompt}
    prefix = _render(tokenizer, [user], add_generation_prompt=True)
    full = _render(tokenizer, [user, {"role": "assistant", "content": response}], add_generation_prompt=False)
    start = len(prefix)
    body = response.strip()
    at = full.find(body, start) if full.startswith(prefix) else -1
    if at >= 0 and not full[start:at].strip():
        end = at + len(body)
        tail = full[end:]
        eos = getattr(tokenizer, "eos_token", None)
        if eos and eos in tail:
            return full[: end + tail.index(eos) + len(eos)], start, False
        # Templates whose end-of-turn marker is not the eos token (e.g. "<|im_end|>" with a base
        # model's eos): learn the marker, drop the whitespace that only separates turns.
        marker = tail.rstrip()
        return full[: end + len(marker)], start, not marker
    # The template rewrites the assistant turn (strips, reorders, injects text): fall back to the
    # rendered prompt followed by the raw response.
    return prefix + response, start, True


def _encode_split(tokenizer, text: str, boundary: int) -> tuple[list[int], int]:
    """Token ids of `text` and how many of them belong to `text[:boundary]` (the prompt)."""
    fast = bool(getattr(tokenizer, "is_fast", False))
    full = tokenizer(text, add_special_tokens=False, return_offsets_mapping=fast)
    ids = list(full["input_ids"])
    prefix_ids = list(tokenizer(text[:boundary], add_special_tokens=False)["input_ids"])
    if ids[: len(prefix_ids)] == prefix_ids:
        return ids, len(prefix_ids)
    if fast:
        # The tokenizer merged characters across the boundary: a token that still carries prompt
        # text counts as prompt, so the first learned token starts at or after the boundary.
        starts = [s for s, _ in full["offset_mapping"]]
        return ids, next((i for i, s in enumerate(starts) if s >= boundary), len(ids))
    # Slow tokenizers give no offsets: encode the two halves separately.
    rest = list(tokenizer(text[boundary:], add_special_tokens=False)["input_ids"])
    return prefix_ids + rest, len(prefix_ids)


def _check_text(name: str, value) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {type(value).__name__}")


def format_example(tokenizer, prompt: str, response: str, max_length: int) -> dict | None:
    """One training example: `input_ids`, `attention_mask`, `labels` (lists of ints, unpadded).

    Labels copy the input ids on response tokens and the end-of-turn token, -100 elsewhere.
    Sequences longer than `max_length` lose tokens from the response end; an example whose prompt
    alone fills `max_length` leaves nothing to learn and is dropped (returns None).
    """
    _check_text("prompt", prompt)
    _check_text("response", response)
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
        raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")
    text, boundary, needs_eos = _training_text(tokenizer, prompt, response)
    ids, n_prompt = _encode_split(tokenizer, text, boundary)
    if needs_eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    if n_prompt >= max_length:
        return None
    ids = ids[:max_length]
    labels = [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def format_prompt(tokenizer, prompt: str) -> str:
    """The text a model sees before it starts answering `prompt` (generation prompt included).

    Tokenize it with `add_special_tokens=False` (or use `encode_prompt`), as training does: the
    template already writes the special tokens it wants (as `apply_chat_template` assumes).
    """
    _check_text("prompt", prompt)
    return _render(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of `format_prompt(tokenizer, prompt)`, exactly as training tokenizes the prompt."""
    text = format_prompt(tokenizer, prompt)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
