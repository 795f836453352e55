"""Batched greedy generation for evaluation: left padding, eos and stop strings, continuation only.

Prompts are tokenized by `safeproj.data.templates.encode_text`, the tokenisation training uses, so
the model is evaluated on exactly the prompt tokens it was tuned on. Stop strings are
transformers' own (`stop_strings`); the stop string itself is then cut from the output.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from safeproj.core.sharded import forward_needs_every_process, root_gathered
from safeproj.data.templates import encode_text, pad_batch


def cut_at_stop(text: str, stops: Sequence[str] | None) -> str:
    """The text up to (not including) the earliest stop string."""
    if not stops:
        return text
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[: min(hits)] if hits else text


def _greedy_config(model, tokenizer, max_new_tokens: int, stop: Sequence[str] | None):
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
    config.stop_strings = list(stop) if stop else None
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

    Batches are left padded, generation stops at eos or at the first stop string, and the stop
    string itself is cut from the output. The model runs in eval mode under no_grad and gets its
    previous train/eval mode back.

    A model sharded with FSDP2 (DTensor parameters) runs a forward only when every process does. So
    every process must call this together: the processes' prompts are gathered (interleaved, as
    `eval.ranks` shares items out: rank r holds items r, r + world, ...), every process generates all of
    them in the batches one process would form, in step (`synced_gpus`), and keeps its own outputs.
    The outputs then equal one process's, at the cost of every process generating every prompt.
    """
    _check_args(prompts, max_new_tokens, batch_size, stop)
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer has no pad token: set tokenizer.pad_token (for example to its eos token)")
    settings = (max_new_tokens, batch_size, stop, desc, progress)
    if not forward_needs_every_process(model):
        return _generate_all(model, tokenizer, list(prompts), *settings)
    everything, mine = _gather_prompts(list(prompts))
    outputs = _generate_all(model, tokenizer, everything, *settings, synced=True)
    return [outputs[i] for i in mine]


def _gather_prompts(prompts: list[str]) -> tuple[list[str], list[int]]:
    """Every process's prompts, interleaved by rank, and the positions of this process's among them."""
    parts: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, prompts)
    everything, mine = [], []
    for i in range(max(len(part) for part in parts)):
        for rank, part in enumerate(parts):
            if i < len(part):
                if rank == dist.get_rank():
                    mine.append(len(everything))
                everything.append(part[i])
    return everything, mine


def _generate_all(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int,
    stop,
    desc: str,
    progress: bool,
    synced: bool = False,
) -> list[str]:
    if not prompts:
        return []
    config = _greedy_config(model, tokenizer, max_new_tokens, stop)
    encoded = [encode_text(tokenizer, p) for p in prompts]
    # Longest prompts first: batches hold prompts of similar length (less padding), and an
    # out-of-memory error shows up on the first batch rather than the last.
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    device = next(model.parameters()).device
    outputs: list[str] = [""] * len(encoded)
    # Sharded weights: generation continues until every process's batch is done, so forwards stay in step.
    extra = {"synced_gpus": True} if synced else {}

    was_training = model.training
    model.eval()
    try:
        with (
            torch.no_grad(),
            root_gathered(model, device),
            tqdm(total=len(encoded), desc=desc, disable=not progress, leave=False) as bar,
        ):
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                features = [{"input_ids": encoded[i], "attention_mask": [1] * len(encoded[i])} for i in idx]
                batch = pad_batch(features, tokenizer.pad_token_id, side="left")
                batch = {k: v.to(device) for k, v in batch.items()}
                out = model.generate(**batch, generation_config=config, tokenizer=tokenizer, **extra)
                prompt_len = batch["input_ids"].shape[1]
                decoded = tokenizer.batch_decode(out[:, prompt_len:], skip_special_tokens=True)
                for i, text in zip(idx, decoded):
                    outputs[i] = cut_at_stop(text, stop)
                bar.update(len(idx))
    finally:
        model.train(was_training)
    return outputs
