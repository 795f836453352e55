"""Prompt sets: named lists of prompts (harmful, benign, ...) for activation recording and harm evaluation.

A prompt-set spec is a built-in set (`builtin:harmful-test`, `builtin:benign-test`, any name in
`safeproj.data.synthetic.BUILTIN`), a local `.json`/`.jsonl`/`.csv` file, or a Hugging Face dataset
`org/name[@split]` (split defaults to train). A `#field` suffix on a file or dataset names the
column; otherwise the first present of `safeproj.data.records.PROMPT_FIELDS` is used.

The default sets contrast harmful and benign *requests of the same form* (same framings, openers and
closers; only the act differs), both from acts no built-in training set uses, so an activation
difference between them is about harm rather than topic, format or training exposure.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from safeproj.data.records import PROMPT_FIELDS, complete_rows, is_hub_name, is_local, load_records
from safeproj.data.synthetic import BUILTIN_PREFIX, builtin_name

DEFAULT_PROMPT_SETS = {"harmful": "builtin:harmful-test", "benign": "builtin:benign-test"}
_SET_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def parse_prompt_spec(spec: str) -> tuple[str, str, str | None]:
    """(source, split, field) of a prompt-set spec; ValueError for a spec that names no known kind of set."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"a prompt-set spec must be a non-empty string, got {spec!r}")
    if spec.startswith(BUILTIN_PREFIX):
        builtin_name(spec, what="prompt set")
        return spec, "train", None
    source, _, field = spec.partition("#")
    if is_local(source):
        return source, "train", field or None
    name, _, split = source.partition("@")
    if is_hub_name(name):
        return name, split or "train", field or None
    raise ValueError(
        f"unknown prompt set {spec!r}: use a built-in set such as builtin:harmful-test, "
        "a .json/.jsonl/.csv file, or a Hugging Face dataset name 'org/name[@split][#field]'"
    )


def check_prompt_sets(prompt_sets: Mapping[str, str]) -> None:
    """Set names usable in file names, and specs of a known kind (whether files exist is checked on loading)."""
    if not prompt_sets:
        raise ValueError("prompt_sets is empty; give at least one {name: spec}")
    for name, spec in prompt_sets.items():
        if not isinstance(name, str) or not _SET_NAME.match(name):
            raise ValueError(f"prompt set name {name!r} must use only letters, digits, '_' and '-'")
        if not isinstance(spec, str) or not spec:
            raise ValueError(f"prompt set {name!r} needs a spec string, got {spec!r}")
        parse_prompt_spec(spec)


# A column naming what a prompt is made from: prompts sharing it are one group for held-out splits.
GROUP_FIELDS = ("act",)


def load_prompt_rows(spec: str, limit: int | None = None, seed: int = 0) -> tuple[list[str], list[str] | None]:
    """The first `limit` non-empty prompts of a prompt-set spec (all of them when None; fewer if the
    set is smaller) and the group (e.g. the act) of each, or None when the set has no group column.
    A built-in set is generated with `seed` and needs a `limit`."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"the number of prompts must be an integer >= 1 or None, got {limit!r}")
    source, split, field = parse_prompt_spec(spec)
    if source.startswith(BUILTIN_PREFIX) and limit is None:
        raise ValueError(f"built-in set {source!r} is generated: give a number of prompts")
    records = load_records(source, split=split, n=limit, seed=seed)
    if len(records) == 0:
        return [], None
    key = field or next((f for f in PROMPT_FIELDS if f in records.columns), None)
    if key is None or key not in records.columns:
        want = field or " | ".join(PROMPT_FIELDS)
        raise ValueError(f"prompt set {spec!r} has no field {want}; fields are {', '.join(records.columns)}")
    rows = complete_rows(records, [key], limit=limit).rows()
    group = next((f for f in GROUP_FIELDS if f in records.columns), None)
    return [str(row[key]) for row in rows], None if group is None else [str(row[group]) for row in rows]


def load_prompts(spec: str, limit: int | None = None, seed: int = 0) -> list[str]:
    """The prompts of `load_prompt_rows`."""
    return load_prompt_rows(spec, limit, seed)[0]


def load_prompt_groups(spec: str, limit: int | None = None, seed: int = 0) -> list[str] | None:
    """The groups of `load_prompt_rows`: one per prompt `load_prompts` gives for the same arguments."""
    return load_prompt_rows(spec, limit, seed)[1]
