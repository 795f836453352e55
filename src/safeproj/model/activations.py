"""Hidden states of a Hugging Face causal LM recorded with forward hooks: layers, positions, batches.

Prompts are formatted and tokenized by `safeproj.data.templates`, exactly as for training and
evaluation. One vector per prompt and layer is kept: the last prompt token, the mean over the
prompt's tokens, or the mean over the assistant marker of the chat template. Batches are left padded
and read through a gather plan, so padding is never averaged in.

The layer output recorded is the hidden state leaving the decoder layer, i.e.
`output_hidden_states[L + 1]` for every layer but the last one, where Hugging Face reports the
output after the final norm instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from safeproj.core.sharded import root_gathered
from safeproj.data.prompts import load_prompt_rows
from safeproj.data.templates import encode_prompt, encode_prompt_marked, pad_batch

POSITIONS = ("last", "mean", "assistant")
# Band of depth (as a share of the layer stack) where the paper looked at activations.
DEFAULT_BAND = (0.65, 0.90)


# --------------------------------------------------------------------------------------------
# Layers


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a Hugging Face causal LM, looking through a PEFT wrapper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    for owner in (decoder, base):
        for attr in ("layers", "h"):
            layers = getattr(owner, attr, None) if owner is not None else None
            if isinstance(layers, nn.ModuleList):
                return layers
    raise ValueError(f"cannot find the decoder layers of {type(base).__name__} (looked for get_decoder().layers)")


def decoder_module(model: nn.Module) -> nn.Module:
    """The module that runs embeddings + decoder layers without the LM head (cheaper to call)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    return decoder if isinstance(decoder, nn.Module) and decoder is not base else base


def resolve_layers(layers: Sequence[int | float] | None, depth: int) -> list[int]:
    """Layer indices from indices (int) or shares of depth (float in [0, 1]); sorted, unique.

    A share f picks layer round(f·(depth − 1)). None picks the default band of depth, or the layer
    nearest its middle when the model is too shallow to have a layer inside it.
    """
    if depth < 1:
        raise ValueError(f"the model has no decoder layers (depth {depth})")
    last = depth - 1
    if layers is None:
        low, high = DEFAULT_BAND
        picked = [i for i in range(depth) if last == 0 or low <= i / last <= high]
        return picked or [round((low + high) / 2 * last)]
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or len(layers) == 0:
        raise ValueError(f"layers must be a non-empty list of indices or depth shares, got {layers!r}")
    picked = set()
    for value in layers:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"layers entries must be int indices or float shares, got {value!r}")
        if isinstance(value, float):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"layer share {value} is outside [0, 1]")
            picked.add(round(value * last))
        elif not 0 <= value < depth:
            raise ValueError(f"layer index {value} is out of range: the model has {depth} layers (0..{last})")
        else:
            picked.add(int(value))
    return sorted(picked)


def context_length(model: nn.Module) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def pad_token_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0  # masked out anyway


# --------------------------------------------------------------------------------------------
# Prompts and left-padded batches


@dataclass(frozen=True)
class EncodedPrompt:
    """Token ids of one formatted prompt and the positions whose hidden states are averaged."""

    ids: tuple[int, ...]
    positions: tuple[int, ...]
    group: str | None = None  # what the prompt is made from (its act), for held-out splits by group


def encode_prompts(tokenizer, prompts: Sequence[str], position: str) -> list[EncodedPrompt]:
    """Format and tokenize each prompt as training does, and pick the positions `position` reads."""
    if position not in POSITIONS:
        raise ValueError(f"position must be one of {POSITIONS}, got {position!r}")
    encoded = []
    for prompt in prompts:
        if position == "assistant":
            try:
                ids, start = encode_prompt_marked(tokenizer, prompt)
            except ValueError as err:
                raise ValueError(f"position='assistant': {err}") from None
        else:
            ids = encode_prompt(tokenizer, prompt)
            start = len(ids) - 1 if position == "last" else 0
        if not ids:
            raise ValueError(f"prompt {prompt[:40]!r} encodes to no tokens")
        encoded.append(EncodedPrompt(tuple(ids), tuple(range(start, len(ids)))))
    return encoded


def prepare_prompt_sets(
    tokenizer, prompt_sets: Mapping[str, str], num_prompts: int, position: str, max_length: int | None, seed: int = 0
) -> dict[str, list[EncodedPrompt]]:
    """Load, format and tokenize every prompt set; checks emptiness and context length."""
    encoded = {}
    for name, spec in prompt_sets.items():
        prompts, groups = load_prompt_rows(spec, num_prompts, seed)
        if not prompts:
            raise ValueError(f"prompt set {name!r} ({spec}) is empty")
        encoded[name] = encode_prompts(tokenizer, prompts, position)
        if groups is not None:
            encoded[name] = [replace(e, group=g) for e, g in zip(encoded[name], groups)]
        for i, e in enumerate(encoded[name]):
            if max_length is not None and len(e.ids) > max_length:
                raise ValueError(
                    f"prompt {i} of set {name!r} has {len(e.ids)} tokens, longer than the model's "
                    f"context (max_position_embeddings={max_length})"
                )
    return encoded


@dataclass
class PaddedBatch:
    """A left-padded batch plus a gather plan that reads only real (non-pad) positions.

    Row b of the recorded output is the mean of hidden[rows[j], cols[j]] over the j with rows[j] == b.
    """

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    position_ids: torch.Tensor  # (B, T); real tokens count from 0 whatever the padding
    rows: torch.Tensor  # (N,)
    cols: torch.Tensor  # (N,)
    counts: torch.Tensor  # (B,) positions averaged per prompt

    def to(self, device: torch.device | str) -> PaddedBatch:
        fields = (self.input_ids, self.attention_mask, self.position_ids, self.rows, self.cols, self.counts)
        return PaddedBatch(*(t.to(device) for t in fields))


def left_pad(encoded: Sequence[EncodedPrompt], pad_id: int) -> PaddedBatch:
    """Left-pad prompts to one length (as generation does) and plan which positions are read."""
    padded = pad_batch([{"input_ids": e.ids, "attention_mask": [1] * len(e.ids)} for e in encoded], pad_id, "left")
    width = padded["input_ids"].shape[1]
    rows, cols = [], []
    for b, e in enumerate(encoded):
        rows += [b] * len(e.positions)
        cols += [width - len(e.ids) + p for p in e.positions]
    mask = padded["attention_mask"]
    return PaddedBatch(
        padded["input_ids"],
        mask,
        (mask.cumsum(-1) - 1).clamp(min=0),
        torch.tensor(rows, dtype=torch.long),
        torch.tensor(cols, dtype=torch.long),
        torch.tensor([len(e.positions) for e in encoded], dtype=torch.long),
    )


def select_rows(hidden: torch.Tensor, batch: PaddedBatch) -> torch.Tensor:
    """(B, T, d) hidden states → (B, d) fp32, averaging the planned positions; pads are never read."""
    picked = hidden[batch.rows, batch.cols].float()  # (N, d)
    out = torch.zeros(batch.counts.numel(), hidden.shape[-1], dtype=torch.float32, device=hidden.device)
    out.index_add_(0, batch.rows, picked)
    return out / batch.counts.to(out.dtype).unsqueeze(-1)


# --------------------------------------------------------------------------------------------
# Hooks


@contextmanager
def record_activations(
    model: nn.Module, layers: Sequence[int], dtype: torch.dtype = torch.float32
) -> Iterator[Callable[[PaddedBatch], dict[int, torch.Tensor]]]:
    """Hooks on `layers` for the duration of the block; yields `capture(batch) -> {layer: (B, d) CPU}`.

    Inside the block the model is in eval mode under no_grad; hooks, grad mode and every module's
    train flag are restored on exit, also when the block raises. A model sharded with FSDP2 has its
    root's own weights gathered for the block (`root_gathered`); its forwards are collectives, so every
    process must call `capture` on the same batches.
    """
    blocks = decoder_layers(model)
    for layer in layers:
        if not 0 <= layer < len(blocks):
            raise ValueError(
                f"layer index {layer} is out of range: the model has {len(blocks)} layers (0..{len(blocks) - 1})"
            )
    decoder = decoder_module(model)
    device = next(model.parameters()).device
    current: dict[str, Any] = {"batch": None, "rows": {}}

    def hook_for(layer: int):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            rows = select_rows(hidden, current["batch"]).to(dtype)
            # A copy on the CPU, never a view of a buffer the model may reuse.
            current["rows"][layer] = rows.detach().to("cpu", copy=True)

        return hook

    def capture(batch: PaddedBatch) -> dict[int, torch.Tensor]:
        current["batch"] = batch.to(device)
        current["rows"] = {}
        decoder(
            input_ids=current["batch"].input_ids,
            attention_mask=current["batch"].attention_mask,
            position_ids=current["batch"].position_ids,
            use_cache=False,
        )
        missing = [layer for layer in layers if layer not in current["rows"]]
        if missing:
            raise RuntimeError(f"decoder layers {missing} did not run during the forward pass")
        rows, current["rows"], current["batch"] = current["rows"], {}, None
        return rows

    training = {module: module.training for module in model.modules()}
    handles = []
    try:
        model.eval()
        with torch.no_grad(), root_gathered(model, device):
            for layer in layers:
                handles.append(blocks[layer].register_forward_hook(hook_for(layer)))
            yield capture
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in training.items():
            module.train(flag)
