"""Instruction data: records from any source, prompt sets, chat formatting and tokenisation, the DataModule."""

from safeproj.data.datamodule import InstructionDataModule, largest_remainder
from safeproj.data.prompts import DEFAULT_PROMPT_SETS, load_prompts
from safeproj.data.records import PROMPT_FIELDS, RESPONSE_FIELDS, Records, load_records
from safeproj.data.sources import ALIASES, SourceSpec, load_pairs
from safeproj.data.synthetic import BUILTIN, arithmetic, harmful_requests
from safeproj.data.templates import (
    IGNORE_INDEX,
    encode_prompt,
    encode_text,
    format_example,
    format_prompt,
    pad_batch,
)

__all__ = [
    "ALIASES",
    "BUILTIN",
    "DEFAULT_PROMPT_SETS",
    "IGNORE_INDEX",
    "PROMPT_FIELDS",
    "RESPONSE_FIELDS",
    "InstructionDataModule",
    "Records",
    "SourceSpec",
    "arithmetic",
    "encode_prompt",
    "encode_text",
    "format_example",
    "format_prompt",
    "harmful_requests",
    "largest_remainder",
    "load_pairs",
    "load_prompts",
    "load_records",
    "pad_batch",
]
