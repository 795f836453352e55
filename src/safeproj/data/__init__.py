"""Instruction data: built-in generated corpus, dataset sources, chat formatting, the DataModule."""

from safeproj.data.datamodule import InstructionDataModule, largest_remainder, pad_batch
from safeproj.data.sources import ALIASES, SourceSpec, load_pairs
from safeproj.data.synthetic import BUILTIN, arithmetic, harmful_requests
from safeproj.data.templates import IGNORE_INDEX, encode_prompt, format_example, format_prompt

__all__ = [
    "ALIASES",
    "BUILTIN",
    "IGNORE_INDEX",
    "InstructionDataModule",
    "SourceSpec",
    "arithmetic",
    "encode_prompt",
    "format_example",
    "format_prompt",
    "harmful_requests",
    "largest_remainder",
    "load_pairs",
    "pad_batch",
]
