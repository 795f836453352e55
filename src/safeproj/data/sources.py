"""Where instruction pairs come from: built-in generated sets, Hugging Face datasets, local files.

`load_pairs(SourceSpec(...), n, seed)` returns `[{"prompt": str, "response": str}, ...]` for any of:

- a built-in name (`builtin:useful`, `builtin:harmful`, ... see `safeproj.data.synthetic.BUILTIN`),
  generated offline to any size;
- a known alias with the right fields (`metamathqa`, `beavertails-unsafe`, `beavertails-safe`,
  `gsm8k`);
- any other Hugging Face dataset name `org/name` (needs a network or a warm cache);
- a local `.json` (a list of records, or JSON Lines), `.jsonl` or `.csv` file.
"""

from __future__ import annotations

import csv
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from safeproj.data.synthetic import BUILTIN, builtin_capacity

LOCAL_SUFFIXES = (".json", ".jsonl", ".csv")
PROMPT_FIELDS = ("prompt", "instruction", "question", "query", "goal")
RESPONSE_FIELDS = ("response", "output", "answer", "target")
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
    "gsm8k": {"path": "openai/gsm8k", "config_name": "main", "prompt_field": "question", "response_field": "answer"},
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
        if not any(_same(row[column], w) for w in wanted):
            return False
    return True


def _non_empty(value) -> bool:
    return value is not None and str(value).strip() != ""


def _resolve_field(given: str | None, defaults: tuple[str, ...], columns: list[str], role: str, where: str) -> str:
    available = ", ".join(columns)
    if given is not None:
        if given not in columns:
            raise ValueError(f"{role} field {given!r} not in {where}; available columns: {available}")
        return given
    for name in defaults:
        if name in columns:
            return name
    raise ValueError(
        f"no {role} field in {where} (looked for {'|'.join(defaults)}); available columns: {available}; "
        f"set {role}_field"
    )


# --- loading --------------------------------------------------------------------------------------


def _is_local(path: str) -> bool:
    return path.lower().endswith(LOCAL_SUFFIXES) or path.startswith((".", "/", "~")) or Path(path).exists()


def _read_local(path: str) -> list[dict]:
    file = Path(path).expanduser()
    if file.is_dir():
        raise ValueError(f"data path {path!r} is a directory; expected a {'/'.join(LOCAL_SUFFIXES)} file")
    if not file.is_file():
        raise ValueError(f"data file not found: {path!r}")
    suffix = file.suffix.lower()
    if suffix not in LOCAL_SUFFIXES:
        raise ValueError(f"unsupported data file {path!r}: expected one of {', '.join(LOCAL_SUFFIXES)}")
    if suffix == ".csv":
        with file.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    text = file.read_text(encoding="utf-8")
    if suffix == ".json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError:
            records = None  # may still be JSON Lines saved as .json
        if records is not None:
            if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
                raise ValueError(f"{path!r}: a .json data file must hold a list of objects")
            return records
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path!r} line {lineno}: invalid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path!r} line {lineno}: expected a JSON object")
        records.append(record)
    return records


def _load_hub(path: str, config_name: str | None, split: str):
    import datasets

    try:
        return datasets.load_dataset(path, config_name, split=split)
    except (ConnectionError, TimeoutError, FileNotFoundError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot load dataset {path!r} (no network?): {first}") from None
    except (OSError, ValueError) as err:  # unknown split or config, corrupt cache, ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot load dataset {path!r}: {first}") from None


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


def _builtin_rows(spec: SourceSpec, want: int, seed: int, conditions: dict) -> list[dict]:
    """The first `want` generated rows that pass `conditions` (fewer if the generator runs out).

    Generators are prefix-stable for a seed, so a larger draw keeps earlier rows in place.
    """
    if spec.split != "train":
        raise ValueError(
            f"built-in sources choose their split by name (e.g. 'builtin:useful-test'), got split={spec.split!r}"
        )
    generate = BUILTIN[spec.path]
    capacity = builtin_capacity(spec.path)
    # Unbounded generators stop growing the draw at a fixed multiple, so an unmatched filter ends.
    most = capacity if capacity is not None else 64 * want + 10_000
    draw = min(want, most)
    while True:
        rows = generate(draw, seed)
        kept = [r for r in rows if _row_matches(r, conditions)] if conditions else rows
        if len(kept) >= want or draw >= most:
            return kept[:want]
        draw = min(2 * draw, most)


def _check_columns(columns: list[str], conditions: dict, where: str) -> None:
    for column in conditions:
        if column not in columns:
            raise ValueError(f"filter column {column!r} not in {where}; available columns: {', '.join(columns)}")


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
        columns = list(BUILTIN[spec.path](1, seed)[0])
        _check_columns(columns, conditions, where)
        want = n if n is not None else (spec.limit or BUILTIN_DEFAULT_SIZE)
        table = _builtin_rows(spec, min(want, spec.limit or want), seed, conditions)
    elif _is_local(spec.path):
        table = _read_local(spec.path)
        if not table:
            raise ValueError(f"{where} is empty")
        columns = list(dict.fromkeys(key for row in table for key in row))
    else:
        table = _load_hub(resolved["path"], resolved["config_name"], resolved["split"])
        columns = list(table.column_names)
    _check_columns(columns, conditions, where)
    prompt_key = _resolve_field(resolved["prompt_field"], PROMPT_FIELDS, columns, "prompt", where)
    response_key = _resolve_field(resolved["response_field"], RESPONSE_FIELDS, columns, "response", where)
    # Alpaca layout: an optional `input` column completes the instruction.
    extra_key = "input" if prompt_key == "instruction" and "input" in columns else None

    def keep(row: dict) -> bool:
        usable = _non_empty(row.get(prompt_key)) and _non_empty(row.get(response_key))
        return usable and (not conditions or _row_matches(row, conditions))

    if isinstance(table, list):
        table = [row for row in table if keep(row)]
        if spec.limit is not None:
            table = table[: spec.limit]
    else:
        table = table.filter(keep, desc=f"filtering {spec.path}")
        if spec.limit is not None and len(table) > spec.limit:
            table = table.select(range(spec.limit))
    if len(table) == 0:
        why = f"filter {conditions}" if conditions else "dropping rows with an empty prompt or response"
        raise ValueError(f"{where} is empty after {why}")
    if n is not None and n > len(table):
        raise ValueError(f"{where} has {len(table)} usable rows but {n} were requested")

    if n is None or builtin:
        order = list(range(len(table) if n is None else n))
    else:
        order = random.Random(f"safeproj.source:{seed}").sample(range(len(table)), n)
    rows = [table[i] for i in order] if isinstance(table, list) else table.select(order).to_list()

    def pair(row: dict) -> dict:
        prompt = str(row[prompt_key])
        if extra_key and _non_empty(row.get(extra_key)):
            prompt = f"{prompt}\n\n{row[extra_key]}"
        return {"prompt": prompt, "response": str(row[response_key])}

    return [pair(row) for row in rows]
