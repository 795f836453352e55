"""Batched greedy generation for evaluation: left padding, eos and stop strings, continuation only."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList


class StopOnStrings(StoppingCriteria):
    """Marks a row finished once its decoded continuation contains any stop string.

    Only the last few tokens are decoded each step: a stop string of c characters spans at most
    c tokens (plus a margin for tokens that decode to nothing), so the check stays O(1) per step.
    """

    def __init__(self, tokenizer, stops: Sequence[str], prompt_len: int):
        self.tokenizer = tokenizer
        self.stops = list(stops)
        self.prompt_len = prompt_len
        self.window = max(len(s) for s in self.stops) + 8

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        tail = input_ids[:, self.prompt_len :][:, -self.window :]
        texts = self.tokenizer.batch_decode(tail, skip_special_tokens=True)
        done = [any(s in text for s in self.stops) for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def cut_at_stop(text: str, stops: Sequence[str] | None) -> str:
    """The text up to (not including) the earliest stop string."""
    if not stops:
        return text
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[: min(hits)] if hits else text


def _with_single_bos(tokenizer, prompts: Sequence[str]) -> list[str]:
    """Prompts carrying the BOS token exactly once.

    Chat templates often write BOS themselves; tokenizing with special tokens would then add a
    second one. We tokenize without special tokens and prepend BOS only where the tokenizer would
    normally add it and the text lacks it.
    """
    bos = tokenizer.bos_token
    if bos is None:
        return list(prompts)
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    adds_bos = len(probe) > 0 and probe[0] == tokenizer.bos_token_id
    if not adds_bos:
        return list(prompts)
    return [p if p.startswith(bos) else bos + p for p in prompts]


def _greedy_config(model, tokenizer, max_new_tokens: int):
    """The model's generation config made greedy, with sampling knobs cleared so none leak in."""
    config = copy.deepcopy(model.generation_config)
    config.do_sample = False
    config.num_beams = 1
    config.temperature = None
    config.top_p = None
    config.top_k = None
    config.max_new_tokens = max_new_tokens
    config.max_length = None
    config.use_cache = True
    config.pad_token_id = tokenizer.pad_token_id
    if config.eos_token_id is None:
        config.eos_token_id = tokenizer.eos_token_id
    return config


def _check_args(prompts, max_new_tokens: int, batch_size: int, stop) -> None:
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a list of strings")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if stop is not None and (isinstance(stop, str) or not all(isinstance(s, str) and s for s in stop)):
        raise ValueError(f"stop must be a list of non-empty strings, got {stop!r}")


def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 128,
    batch_size: int = 8,
    stop: Sequence[str] | None = None,
    desc: str = "generating",
    progress: bool = True,
) -> list[str]:
    """Greedy continuations of already formatted prompts, in input order.

    Batches are left padded (the tokenizer's padding side is restored afterwards), generation stops
    at eos or at the first stop string, and the stop string itself is cut from the output. The model
    runs in eval mode under no_grad and gets its previous train/eval mode back.
    """
    _check_args(prompts, max_new_tokens, batch_size, stop)
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer has no pad token: set tokenizer.pad_token (for example to its eos token)")
    if not prompts:
        return []
    texts = _with_single_bos(tokenizer, prompts)
    # Longest prompts first: batches hold prompts of similar length (less padding), and an
    # out-of-memory error shows up on the first batch rather than the last.
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    device = next(model.parameters()).device
    config = _greedy_config(model, tokenizer, max_new_tokens)
    outputs: list[str] = [""] * len(texts)

    was_training = model.training
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    model.eval()
    try:
        with torch.no_grad(), tqdm(total=len(texts), desc=desc, disable=not progress, leave=False) as bar:
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
                enc = {k: v.to(device) for k, v in enc.items()}
                prompt_len = enc["input_ids"].shape[1]
                criteria = StoppingCriteriaList([StopOnStrings(tokenizer, stop, prompt_len)]) if stop else None
                out = model.generate(**enc, generation_config=config, stopping_criteria=criteria)
                decoded = tokenizer.batch_decode(out[:, prompt_len:], skip_special_tokens=True)
                for i, text in zip(idx, decoded):
                    outputs[i] = cut_at_stop(text, stop)
                bar.update(len(idx))
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return outputs
