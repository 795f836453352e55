"""Atomic writes: every file safeproj leaves is either complete or absent.

A file is written to a temp name in its own folder and renamed into place (`os.replace` is atomic within
one file system), so a crash or Ctrl-C never leaves half a CSV for a sweep or report to misread.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; it becomes `path` when the block ends cleanly, else it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: str | os.PathLike, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside `path`; it becomes `path` when the block ends cleanly, else it is removed.

    An existing `path` is swapped out whole (never merged), or, with `keep_existing`, kept: for caches
    that another process may have filled meanwhile with the same content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if path.exists() and keep_existing:
            shutil.rmtree(tmp)
        elif path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-old-"))
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.replace(tmp, path)
            except OSError:
                if not (keep_existing and path.exists()):
                    raise
                shutil.rmtree(tmp)  # another process made it meanwhile: keep theirs
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, data: Any, indent: int = 2, default=None, allow_nan: bool = True) -> Path:
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=indent, allow_nan=allow_nan, ensure_ascii=False, default=default)
    return Path(path)


def write_csv(path: str | os.PathLike, rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> Path:
    """Rows as CSV; the columns default to every key in order of first appearance."""
    columns = list(columns) if columns is not None else list(dict.fromkeys(k for row in rows for k in row))
    with atomic_file(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return Path(path)


def write_rows(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Rows as CSV or JSON, chosen by the suffix of `path`."""
    path = Path(path)
    if path.suffix not in (".csv", ".json"):
        raise ValueError(f"rows are written as .csv or .json, got {str(path)!r}")
    if path.suffix == ".csv":
        return write_csv(path, rows)
    return write_json(path, list(rows), indent=1, default=str)


def plain_float(value: Any) -> float | None:
    """A finite float, or None for NaN/inf and values that are not numbers (JSON stays strict)."""
    if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def plain_row(row: dict[str, Any]) -> dict[str, Any]:
    """A post hoc row with numbers as finite floats or None, strings and flags as they are."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        if value is None or isinstance(value, (str, bool)):
            out[key] = value
        elif isinstance(value, (int, float)) or hasattr(value, "item"):
            out[key] = plain_float(value)
        else:
            out[key] = str(value)
    return out
