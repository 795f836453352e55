"""Records: the rows of a built-in generated set, a local .json/.jsonl/.csv file or a Hugging Face dataset.

Every reader of data goes through `load_records`: training sources (`safeproj.data.sources`), prompt
sets (`safeproj.data.prompts`), the GSM8k and harm evaluations. So a file that trains a model can
evaluate it, and every data error reads the same way: one line naming the file and line.

Local files are read with the standard library, which knows the line each row came from and reads
values as written; hub datasets go through `datasets.load_dataset` and stay Arrow tables, so
filtering and sampling a large set never copies it whole. Rows missing a field a caller needs are
dropped by `complete_rows`, which says how many and where.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn

from safeproj.data.synthetic import BUILTIN, BUILTIN_PREFIX, builtin_capacity, builtin_name

LOCAL_SUFFIXES = (".json", ".jsonl", ".csv")
# Field names tried in order when a caller names none, for training sources, harmful prompts and
# activation prompt sets alike: AdvBench (`prompt` on the hub, `goal` in its csv), Alpaca and
# refusal_direction (`instruction`), GSM8k (`question`), MetaMathQA (`query`).
PROMPT_FIELDS = ("prompt", "instruction", "question", "query", "goal")
RESPONSE_FIELDS = ("response", "output", "answer", "target")
HUB_CONFIGS = {"openai/gsm8k": "main"}  # hub datasets that cannot load without a configuration name
SHOWN_LOCATIONS = 5  # dropped rows named in a warning


@dataclass
class Records:
    """The rows of one source and where each came from.

    `table` is a list of dicts, or a `datasets.Dataset` for a hub set; `numbers[i]` is the line (of a
    .jsonl or .csv file), item (of a .json list) or row number of row i, counted from 1.
    """

    source: str
    table: Any
    columns: list[str]
    unit: str = "row"
    numbers: list[int] | None = None  # None: row i is number i + 1

    def __len__(self) -> int:
        return len(self.table)

    def location(self, i: int) -> str:
        """Where row i sits in its source: "line 7", "item 3" or "row 12"."""
        return f"{self.unit} {self.numbers[i] if self.numbers is not None else i + 1}"

    def where(self, i: int) -> str:
        return f"{self.source} {self.location(i)}"

    def iter_rows(self, columns: Sequence[str] | None = None) -> Iterator[dict]:
        """Rows in order; for a hub set only `columns` are decoded."""
        if isinstance(self.table, list):
            return iter(self.table)
        wanted = [c for c in columns or () if c in self.columns]
        return iter(self.table.select_columns(wanted) if wanted else self.table)

    def select(self, indices: Sequence[int]) -> Records:
        indices = list(indices)
        table = [self.table[i] for i in indices] if isinstance(self.table, list) else self.table.select(indices)
        numbers = [self.numbers[i] if self.numbers is not None else i + 1 for i in indices]
        return Records(self.source, table, self.columns, self.unit, numbers)

    def keep(self, predicate: Callable[[dict], bool], columns: Sequence[str] | None = None) -> Records:
        """The rows for which `predicate(row)` holds, in order."""
        return self.select([i for i, row in enumerate(self.iter_rows(columns)) if predicate(row)])

    def rows(self) -> list[dict]:
        return list(self.table) if isinstance(self.table, list) else self.table.to_list()


# --- which kind of source --------------------------------------------------------------------------


def is_local(path: str) -> bool:
    return path.lower().endswith(LOCAL_SUFFIXES) or path.startswith((".", "/", "~")) or Path(path).exists()


def is_hub_name(name: str) -> bool:
    owner, _, dataset = name.partition("/")
    return bool(owner) and bool(dataset) and "/" not in dataset and not name.startswith((".", "~"))


def source_kind(source: str) -> str:
    """The kind of `source`: "builtin", "local" or "hub"; a ValueError for anything else."""
    if not isinstance(source, str) or not source:
        raise ValueError(f"a data source must be a non-empty string, got {source!r}")
    if source.startswith(BUILTIN_PREFIX):
        builtin_name(source)
        return "builtin"
    if is_local(source):
        return "local"
    if is_hub_name(source):
        return "hub"
    raise ValueError(
        f"unknown data source {source!r}: not a built-in set (builtin:...), a {'/'.join(LOCAL_SUFFIXES)} file "
        "or a Hugging Face dataset name 'org/name'"
    )


# --- loading -----------------------------------------------------------------------------------------


def load_records(
    source: str, *, split: str = "train", config_name: str | None = None, n: int | None = None, seed: int = 0
) -> Records:
    """The rows of `source`: a built-in set (`n` rows generated with `seed`, or all it has if fewer),
    a local .json (a list of objects, or JSON Lines), .jsonl or .csv file, or a hub dataset `org/name`
    (`split`, `config_name`; needs a network or a warm cache). Raises ValueError (one line)."""
    kind = source_kind(source)
    if kind == "builtin":
        return _generate(source, n, seed)
    if kind == "local":
        return _read_local(source)
    return _load_hub(source, config_name or HUB_CONFIGS.get(source), split)


def _generate(name: str, n: int | None, seed: int) -> Records:
    if n is None or isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"built-in set {name!r} is generated: give a number of rows >= 1, got {n!r}")
    capacity = builtin_capacity(name)
    if capacity is not None and n > capacity:
        rank_zero_warn(f"{name} has {capacity} distinct rows; using all of them instead of {n}")
        n = capacity
    rows = BUILTIN[builtin_name(name)](n, seed)
    return Records(name, rows, list(rows[0]) if rows else [])


def _read_local(path: str) -> Records:
    file = Path(path).expanduser()
    if file.is_dir():
        raise ValueError(f"data path {path!r} is a directory; expected a {'/'.join(LOCAL_SUFFIXES)} file")
    if not file.is_file():
        raise ValueError(
            f"data file not found: {path!r} (not a built-in set, an existing file or a hub name 'org/name')"
        )
    suffix = file.suffix.lower()
    if suffix not in LOCAL_SUFFIXES:
        raise ValueError(f"unsupported data file {path!r}: expected one of {', '.join(LOCAL_SUFFIXES)}")
    text = None if suffix == ".csv" else file.read_text(encoding="utf-8")
    items = _read_json_list(text, path) if suffix == ".json" else None
    if items is not None:
        rows, numbers, unit = items, list(range(1, len(items) + 1)), "item"
    else:
        numbered = _read_csv(file, path) if suffix == ".csv" else _read_json_lines(text, path)
        rows, numbers, unit = [row for row, _ in numbered], [line for _, line in numbered], "line"
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return Records(path, rows, columns, unit, numbers)


def _read_csv(file: Path, path: str) -> list[tuple[dict, int]]:
    with file.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        out = []
        for row in reader:
            if None in row:  # DictReader files surplus cells under the key None
                raise ValueError(
                    f"{path} line {reader.line_num}: {len(reader.fieldnames) + len(row[None])} cells but the header "
                    f"has {len(reader.fieldnames)}"
                )
            out.append((row, reader.line_num))
        return out


def _read_json_list(text: str, path: str) -> list[dict] | None:
    """The objects of a .json file holding a list; None when the text is not one JSON document."""
    try:
        records = json.loads(text)
    except json.JSONDecodeError:
        return None  # may still be JSON Lines saved as .json
    if not isinstance(records, list):
        raise ValueError(f"{path!r}: a .json data file must hold a list of objects (or one object per line)")
    for i, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise ValueError(f"{path} item {i}: expected a JSON object, got {type(record).__name__}")
    return records


def _read_json_lines(text: str, path: str) -> list[tuple[dict, int]]:
    out = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} line {lineno}: invalid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path} line {lineno}: expected a JSON object, got {type(record).__name__}")
        out.append((record, lineno))
    return out


def _load_hub(name: str, config_name: str | None, split: str) -> Records:
    import datasets

    try:
        table = datasets.load_dataset(name, config_name, split=split)
    except (ConnectionError, TimeoutError, FileNotFoundError) as err:
        raise ValueError(f"cannot load dataset {name!r} (no network?): {_first_line(err)}") from None
    except (OSError, ValueError) as err:  # unknown split or config, corrupt cache, ...
        raise ValueError(f"cannot load dataset {name!r}: {_first_line(err)}") from None
    return Records(name, table, list(table.column_names))


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# --- fields ----------------------------------------------------------------------------------------


def pick_field(columns: Sequence[str], given: str | None, defaults: Sequence[str], role: str, where: str) -> str:
    """`given` if it is a column, else the first of `defaults` that is; one-line errors listing the columns."""
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


def filled(value) -> bool:
    return value is not None and str(value).strip() != ""


def complete_rows(records: Records, fields: Sequence[str], limit: int | None = None) -> Records:
    """The rows whose `fields` are all present and non-blank, the first `limit` of them if given.

    Dropped rows are counted and reported in one warning naming the first few by line.
    """
    kept, dropped, read = [], [], 0
    for i, row in enumerate(records.iter_rows(fields)):
        if limit is not None and len(kept) >= limit:
            break
        read += 1
        (kept if all(filled(row.get(f)) for f in fields) else dropped).append(i)
    if dropped:
        shown = ", ".join(records.location(i) for i in dropped[:SHOWN_LOCATIONS])
        more = ", ..." if len(dropped) > SHOWN_LOCATIONS else ""
        rank_zero_warn(
            f"{records.source}: dropped {len(dropped)} of {read} rows with an empty {' or '.join(fields)} "
            f"({shown}{more})"
        )
    return records if len(kept) == len(records) else records.select(kept)
