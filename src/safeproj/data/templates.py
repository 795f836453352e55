"""Prompt formatting and tokenisation: the one path for training, evaluation and activation recording.

Training examples, generation prompts and recorded prompts go through the same chat template and the
same tokenisation (`encode_text`: the template writes every special token the model expects, the
tokenizer adds none), so a model is evaluated and recorded on exactly the tokens it was tuned on.
Tokenizers without a chat template use the Alpaca-style `CHAT_TEMPLATE` below.

Loss is on the response only: every prompt token (system text, user turn, the assistant marker of
the generation prompt) is labelled -100; the response and its end-of-turn token are learned.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

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


def _tokenize(tokenizer, text: str, offsets: bool = False):
    # No special tokens added: the chat template already wrote the ones the model expects (BOS
    # included, where the template has one), as `apply_chat_template` assumes.
    return tokenizer(text, add_special_tokens=False, return_offsets_mapping=offsets)


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of already formatted text, exactly as training tokenizes it."""
    return list(_tokenize(tokenizer, text)["input_ids"])


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
    full = _tokenize(tokenizer, text, offsets=fast)
    ids = list(full["input_ids"])
    prefix_ids = encode_text(tokenizer, text[:boundary])
    if ids[: len(prefix_ids)] == prefix_ids:
        return ids, len(prefix_ids)
    if fast:
        # The tokenizer merged characters across the boundary: a token that still carries prompt
        # text counts as prompt, so the first learned token starts at or after the boundary.
        starts = [s for s, _ in full["offset_mapping"]]
        return ids, next((i for i, s in enumerate(starts) if s >= boundary), len(ids))
    # Slow tokenizers give no offsets: encode the two halves separately.
    rest = encode_text(tokenizer, text[boundary:])
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


def format_prompt(tokenizer, prompt: str, history: Sequence[tuple[str, str]] = ()) -> str:
    """The text a model sees before it starts answering `prompt` (generation prompt included).

    `history` holds earlier (user, assistant) turns, e.g. few-shot exemplars. Tokenize the result
    with `encode_text` (or use `encode_prompt`).
    """
    _check_text("prompt", prompt)
    messages = []
    for user, assistant in history:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return _render(tokenizer, [*messages, {"role": "user", "content": prompt}], add_generation_prompt=True)


def raw_prompt(tokenizer, prompt: str) -> str:
    """`prompt` as plain text with no chat template (the paper's AdvBench prompts), starting with the BOS
    token where the tokenizer adds one itself, as `tokenizer(prompt)` and vLLM's `generate` do."""
    _check_text("prompt", prompt)
    bos, bos_id = getattr(tokenizer, "bos_token", None), getattr(tokenizer, "bos_token_id", None)
    if bos is None or bos_id is None or prompt.startswith(bos):
        return prompt
    adds_bos = tokenizer(prompt, add_special_tokens=True)["input_ids"][:1] == [bos_id]
    return f"{bos}{prompt}" if adds_bos and encode_text(tokenizer, prompt)[:1] != [bos_id] else prompt


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of `format_prompt(tokenizer, prompt)`, exactly as training tokenizes the prompt."""
    return encode_text(tokenizer, format_prompt(tokenizer, prompt))


def encode_prompt_marked(tokenizer, prompt: str) -> tuple[list[int], int]:
    """(`encode_prompt` ids, index of the first token of the assistant marker), where the marker is
    the text the chat template appends as its generation prompt; a token straddling it counts."""
    user = [{"role": "user", "content": prompt}]
    text = format_prompt(tokenizer, prompt)
    bare = _render(tokenizer, user, add_generation_prompt=False)
    if not text.startswith(bare) or len(text) == len(bare):
        raise ValueError("the assistant marker needs a chat template that appends a generation prompt")
    boundary = len(bare)
    fast = bool(getattr(tokenizer, "is_fast", False))
    encoded = _tokenize(tokenizer, text, offsets=fast)
    ids = list(encoded["input_ids"])
    if fast:
        start = next((i for i, (_, end) in enumerate(encoded["offset_mapping"]) if end > boundary), len(ids))
    else:
        start = len(encode_text(tokenizer, text[:boundary]))
    if start >= len(ids):
        raise ValueError("the chat template's generation prompt encodes to no tokens")
    return ids, start


def pad_batch(features: list[dict], pad_id: int, side: str = "right") -> dict[str, torch.Tensor]:
    """Pad to the longest sequence of the batch: `pad_id` in input ids, 0 in the attention mask,
    -100 in labels (when present). Right padding for training, left padding for generation."""
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    if not features:
        raise ValueError("pad_batch got an empty batch")
    width = max(len(f["input_ids"]) for f in features)
    fills = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    keys = [k for k in fills if k in features[0]]
    out: dict[str, list[list[int]]] = {k: [] for k in keys}
    for f in features:
        gap = width - len(f["input_ids"])
        for k in keys:
            pad = [fills[k]] * gap
            out[k].append(list(f[k]) + pad if side == "right" else pad + list(f[k]))
    return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}
