"""What a Hugging Face tensor name says: its decoder block and its module type, and how both sort."""

from __future__ import annotations

import re

# A block index is a whole dotted component after a blocks container: `model.layers.3.` (Llama, Qwen,
# Mistral), `transformer.h.3.` (GPT-2), `encoder.layer.3.`, `blocks.3.`. Matching whole components keeps
# `model.layers_norm.weight` or `model.player.q_proj.weight` from being read as layers.
BLOCK = r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\."
_BLOCK = re.compile(BLOCK)
# Canonical order of decoder-block projections in tables and plots; other module types follow, sorted.
MODULE_ORDER = ("q", "k", "v", "o", "qkv", "gate", "up", "gate_up", "down")
# `q_proj` -> `q`; GPT-2's `c_proj` appears under both attn and mlp, so it keeps its full name.
_PROJ = re.compile(r"(?!c_proj$)(\w+)_proj")
_PARAM_SUFFIXES = ("weight", "bias", "base_layer")
_LAYER_LABEL = re.compile(r"layer_(\d+)")


def layer_index(name: str) -> int | None:
    """The decoder block a tensor belongs to, or None outside the blocks."""
    match = _BLOCK.search(name)
    return int(match.group(1)) if match else None


def parse_name(name: str) -> tuple[int | None, str]:
    """(block index or None, module type) of a Hugging Face tensor name.

    `model.layers.3.self_attn.q_proj.weight` -> (3, "q"); `lm_head.weight` -> (None, "lm_head").
    """
    parts = [p for p in name.split(".") if p and p not in _PARAM_SUFFIXES]
    leaf = parts[-1] if parts else name
    proj = _PROJ.fullmatch(leaf)
    return layer_index(name), proj.group(1) if proj else leaf


def module_sort_key(module: str) -> tuple[int, str]:
    return (MODULE_ORDER.index(module), "") if module in MODULE_ORDER else (len(MODULE_ORDER), module)


def layer_of(name: str) -> str:
    """`layer_3` for a weight inside decoder block 3, else the module name (`lm_head`)."""
    layer = layer_index(name)
    return f"layer_{layer}" if layer is not None else name.removesuffix(".weight")


def layer_sort_key(label: str) -> tuple[int, int, str]:
    """Orders `layer_of` labels: blocks by index, then every other name alphabetically."""
    match = _LAYER_LABEL.fullmatch(label)
    return (0, int(match.group(1)), "") if match else (1, 0, label)
