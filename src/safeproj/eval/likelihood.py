"""Teacher-forced log-likelihood of given continuations, per item: the core of the continuous metrics.

Each (prompt, response) pair is encoded by `format_example`, exactly as training encodes it, so the
scored tokens are the tokens training learns: the response and its end-of-turn marker, never the
prompt. Batches are right padded; padding sits after every scored token of a row and is masked out of
attention, so an item's value does not depend on what it is batched with.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from safeproj.core.sharded import forward_needs_every_process
from safeproj.data.templates import IGNORE_INDEX, format_example, pad_batch

DEFAULT_MAX_LENGTH = 1024  # tokens per prompt + response; longer responses lose their end, as in training


def token_logprob_sums(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-probability of its labelled tokens (float64) and how many there are.

    `logits` is (B, T, V) from a causal LM, `labels` (B, T) holds the token ids to score and -100
    elsewhere; position t predicts label t + 1, as in Hugging Face's loss.
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} differ in (batch, length)")
    targets = labels[:, 1:]  # (B, T-1)
    scored = targets != IGNORE_INDEX
    rows = scored.nonzero()[:, 0]  # the row of every scored position
    # Only scored positions go through the softmax: (M, V) instead of (B, T, V) in float32.
    nll = F.cross_entropy(logits[:, :-1][scored].float(), targets[scored], reduction="none")
    sums = torch.zeros(labels.shape[0], dtype=torch.float64, device=logits.device)
    sums.index_add_(0, rows, -nll.double())
    return sums, scored.sum(dim=1)


def encode_pairs(tokenizer, pairs: Sequence[tuple[str, str]], max_length: int = DEFAULT_MAX_LENGTH) -> list[dict]:
    """`format_example` of every (prompt, response); an item whose prompt fills `max_length` is an error."""
    features = []
    for i, (prompt, response) in enumerate(pairs):
        feature = format_example(tokenizer, prompt, response, max_length)
        if feature is None or all(label == IGNORE_INDEX for label in feature["labels"]):
            raise ValueError(f"item {i}: no response token fits in max_length={max_length}; raise max_length")
        features.append(feature)
    return features


@torch.no_grad()
def continuation_logprobs(
    model,
    tokenizer,
    pairs: Sequence[tuple[str, str]],
    batch_size: int = 8,
    max_length: int = DEFAULT_MAX_LENGTH,
    desc: str = "log-likelihood",
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log p of each response's tokens given its prompt, token counts), on CPU, in input order.

    The mean per-token log-likelihood of item i is `sums[i] / counts[i]`. The model runs in eval mode
    and gets its previous train/eval mode back.

    A model sharded with FSDP2 (DTensor parameters) runs a forward only when every process does, so
    every process must call this together (each with its own items): a process with fewer batches than
    another runs one-token forwards, discarded, until all have run as many.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    features = encode_pairs(tokenizer, pairs, max_length)
    sums = torch.zeros(len(features), dtype=torch.float64)
    counts = torch.zeros(len(features), dtype=torch.long)
    in_step = forward_needs_every_process(model)
    if not features and not in_step:
        return sums, counts
    pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
    # Longest first: batches hold similar lengths (little padding), and memory peaks on the first batch.
    order = sorted(range(len(features)), key=lambda i: -len(features[i]["input_ids"]))
    device = next(model.parameters()).device
    starts = list(range(0, len(order), batch_size))
    batches = _most_batches(len(starts), device) if in_step else len(starts)
    was_training = model.training
    model.eval()
    try:
        for b in tqdm(range(batches), desc=desc, disable=not progress, leave=False):
            if b >= len(starts):  # this process is out of items: a forward the others' batches need
                model(input_ids=torch.full((1, 1), pad_id, device=device), use_cache=False)
                continue
            idx = order[starts[b] : starts[b] + batch_size]
            batch = pad_batch([features[i] for i in idx], pad_id, side="right")
            logits = model(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                use_cache=False,
            ).logits
            batch_sums, batch_counts = token_logprob_sums(logits, batch["labels"].to(device))
            sums[idx], counts[idx] = batch_sums.cpu(), batch_counts.cpu()
    finally:
        model.train(was_training)
    return sums, counts


def _most_batches(batches: int, device: torch.device) -> int:
    """The largest number of batches any process has: one all-reduce of a single number."""
    most = torch.tensor([batches], dtype=torch.long, device=device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    return int(most.item())
