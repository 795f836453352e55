"""Where instruction pairs come from: built-in generated sets, Hugging Face datasets, local files.

`load_pairs(SourceSpec(...), n, seed)` returns `[{"prompt": str, "response": str}, ...]` for any of:

- a built-in name (`builtin:useful`, `builtin:harmful`, ... see `safeproj.data.synthetic.BUILTIN`),
  generated offline to any size;
- a known alias with the right fields (`metamathqa`, `beavertails-unsafe`, `beavertails-safe`,
  `gsm8k`);
- any other Hugging Face dataset name `org/name` (needs a network or a warm cache);
- a local `.json` (a list of records, or JSON Lines), `.jsonl` or `.csv` file.

Rows are read by `safeproj.data.records.load_records`; rows with an empty prompt or response are
dropped there and reported.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from safeproj.data.records import (
    PROMPT_FIELDS,
    RESPONSE_FIELDS,
    Records,
    complete_rows,
    filled,
    load_records,
    pick_field,
)
from safeproj.data.synthetic import BUILTIN, builtin_capacity

BUILTIN_DEFAULT_SIZE = 1000  # examples generated for a built-in source when neither n nor limit is set

# Aliases: the paper's datasets with their field names. `splits` maps the usual split names onto
# the dataset's own; a split not listed is passed through unchanged.
ALIASES: dict[str, dict] = {
    "metamathqa": {"path": "meta-math/MetaMathQA", "prompt_field": "query", "response_field": "response"},
    "beavertails-unsafe": {
        "path": "PKU-Alignment/BeaverTails",
        "prompt_field": "prompt",
        "response_field": "response",
        "splits": {"train": "330k_train", "test": "330k_test"},
        "filter": {"is_safe": False},
    },
    "beavertails-safe": {
        "path": "PKU-Alignment/BeaverTails",
        "prompt_field": "prompt",
        "response_field": "response",
        "splits": {"train": "330k_train", "test": "330k_test"},
        "filter": {"is_safe": True},
    },
    "gsm8k": {"path": "openai/gsm8k", "prompt_field": "question", "response_field": "answer"},
}


@dataclass
class SourceSpec:
    """One source of (prompt, response) pairs and its share of a mixture.

    Args:
        path: builtin:<name>, an alias (metamathqa, beavertails-unsafe, beavertails-safe, gsm8k),
            a Hugging Face dataset 'org/name', or a local .json/.jsonl/.csv file.
        weight: share of the mixture, relative to the other sources' weights.
        prompt_field: column holding the prompt (default: the first present of
            prompt|instruction|question|query|goal).
        response_field: column holding the response (default: the first present of
            response|output|answer|target).
        split: dataset split; aliases map train/test to their own split names.
        config_name: Hugging Face dataset configuration.
        filter: keep rows whose column equals the value, or is one of a list of values
            (e.g. {is_safe: false}); CSV text matches typed values ("False" == false).
        limit: use only the first `limit` rows after filtering.
    """

    path: str
    weight: float = 1.0
    prompt_field: str | None = None
    response_field: str | None = None
    split: str = "train"
    config_name: str | None = None
    filter: dict | None = None
    limit: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path.strip():
            raise ValueError(f"SourceSpec.path must be a non-empty string, got {self.path!r}")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)):
            raise ValueError(f"SourceSpec.weight must be a number, got {self.weight!r} for {self.path!r}")
        if not math.isfinite(self.weight) or self.weight <= 0:
            raise ValueError(f"SourceSpec.weight must be finite and > 0, got {self.weight!r} for {self.path!r}")
        for name in ("prompt_field", "response_field", "config_name"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"SourceSpec.{name} must be a non-empty string or None, got {value!r}")
        if not isinstance(self.split, str) or not self.split:
            raise ValueError(f"SourceSpec.split must be a non-empty string, got {self.split!r}")
        if self.filter is not None and (not isinstance(self.filter, dict) or not self.filter):
            raise ValueError(f"SourceSpec.filter must be a non-empty mapping or None, got {self.filter!r}")
        if self.limit is not None and (
            isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1
        ):
            raise ValueError(f"SourceSpec.limit must be a positive integer or None, got {self.limit!r}")
        if self.path.startswith("builtin:") and self.path not in BUILTIN:
            raise ValueError(f"unknown built-in source {self.path!r}; known: {', '.join(sorted(BUILTIN))}")


# --- filtering and field mapping ----------------------------------------------------------------


def _same(cell, want) -> bool:
    """Equality that also matches CSV text against typed filter values ("False" == False, "3" == 3)."""
    if cell == want:
        return True
    if isinstance(cell, str) and not isinstance(want, str) and want is not None:
        return cell.strip().lower() == str(want).lower()
    return False


def _row_matches(row: dict, conditions: dict) -> bool:
    for column, want in conditions.items():
        wanted = want if isinstance(want, (list, tuple, set)) else (want,)
        if not any(_same(row.get(column), w) for w in wanted):
            return False
    return True


def _resolved(spec: SourceSpec) -> dict:
    """The spec with alias defaults filled in where the user left a field unset."""
    alias = ALIASES.get(spec.path.lower(), {})
    return {
        "path": alias.get("path", spec.path),
        "prompt_field": spec.prompt_field or alias.get("prompt_field"),
        "response_field": spec.response_field or alias.get("response_field"),
        "config_name": spec.config_name or alias.get("config_name"),
        "split": alias.get("splits", {}).get(spec.split, spec.split),
        "filter": {**alias.get("filter", {}), **(spec.filter or {})},
    }


def _check_columns(columns: list[str], conditions: dict, where: str) -> None:
    for column in conditions:
        if column not in columns:
            raise ValueError(f"filter column {column!r} not in {where}; available columns: {', '.join(columns)}")


def _builtin_records(spec: SourceSpec, want: int, seed: int, conditions: dict, where: str) -> Records:
    """The first `want` generated rows that pass `conditions` (fewer if the generator runs out).

    Generators are prefix-stable for a seed, so a larger draw keeps earlier rows in place.
    """
    if spec.split != "train":
        raise ValueError(
            f"built-in sources choose their split by name (e.g. 'builtin:useful-test'), got split={spec.split!r}"
        )
    _check_columns(list(BUILTIN[spec.path](1, seed)[0]), conditions, where)
    capacity = builtin_capacity(spec.path)
    # Unbounded generators stop growing the draw at a fixed multiple, so an unmatched filter ends.
    most = capacity if capacity is not None else 64 * want + 10_000
    draw = min(want, most)
    while True:
        records = load_records(spec.path, n=draw, seed=seed)
        if conditions:
            records = records.keep(lambda row: _row_matches(row, conditions))
        if len(records) >= want or draw >= most:
            return records.select(range(min(want, len(records))))
        draw = min(2 * draw, most)


def load_pairs(spec: SourceSpec, n: int | None = None, seed: int = 0) -> list[dict]:
    """`n` (prompt, response) pairs from `spec`: a seeded sample, or all rows in order when n is None.

    Built-in sources are generated (their order is already a seeded draw); a built-in source
    without `n` or `limit` gives BUILTIN_DEFAULT_SIZE pairs. Raises ValueError (one line) for a
    missing file, an unknown field or filter column, a source left empty by filtering, fewer usable
    rows than `n`, or a hub dataset that cannot be reached.
    """
    if not isinstance(spec, SourceSpec):
        raise ValueError(f"spec must be a SourceSpec, got {type(spec).__name__}")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise ValueError(f"n must be a non-negative integer or None, got {n!r}")
    if n == 0:
        return []
    where = f"source {spec.path!r}"
    resolved = _resolved(spec)
    conditions = resolved["filter"]

    builtin = spec.path in BUILTIN
    if builtin:
        want = n if n is not None else (spec.limit or BUILTIN_DEFAULT_SIZE)
        records = _builtin_records(spec, min(want, spec.limit or want), seed, conditions, where)
    else:
        records = load_records(resolved["path"], split=resolved["split"], config_name=resolved["config_name"])
        if len(records) == 0:
            raise ValueError(f"{where} is empty")
        _check_columns(records.columns, conditions, where)
        if conditions:
            records = records.keep(lambda row: _row_matches(row, conditions), columns=list(conditions))
    if len(records) == 0:
        raise ValueError(f"{where} is empty after filter {conditions}")
    prompt_key = pick_field(records.columns, resolved["prompt_field"], PROMPT_FIELDS, "prompt", where)
    response_key = pick_field(records.columns, resolved["response_field"], RESPONSE_FIELDS, "response", where)
    # Alpaca layout: an optional `input` column completes the instruction.
    extra_key = "input" if prompt_key == "instruction" and "input" in records.columns else None
    records = complete_rows(records, [prompt_key, response_key], limit=spec.limit)
    if len(records) == 0:
        raise ValueError(f"{where} is empty after dropping rows with an empty prompt or response")
    if n is not None and n > len(records):
        raise ValueError(f"{where} has {len(records)} usable rows but {n} were requested")

    if n is None or builtin:
        order = range(len(records) if n is None else n)
    else:
        order = random.Random(f"safeproj.source:{seed}").sample(range(len(records)), n)

    def pair(row: dict) -> dict:
        prompt = str(row[prompt_key])
        if extra_key and filled(row.get(extra_key)):
            prompt = f"{prompt}\n\n{row[extra_key]}"
        return {"prompt": prompt, "response": str(row[response_key])}

    return [pair(row) for row in records.select(order).rows()]
