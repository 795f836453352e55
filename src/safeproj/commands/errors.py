"""One error path for every command: bad input ends as one line naming the key or file, the bad value and
the fix; `--debug` or SAFEPROJ_DEBUG=1 shows the traceback instead."""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
from argparse import ArgumentError
from collections.abc import Iterator
from contextlib import contextmanager

DEBUG_FLAG = "--debug"
DEBUG_ENV = "SAFEPROJ_DEBUG"

# jsonargparse's explanation of a failed union (e.g. `trainer.callbacks`: list | Callback | None) lists
# every subtype; only the first error, the one for the list of callbacks, concerns the user.
_NOISE = (
    "Does not validate against any of the Union subtypes",
    "Subtypes:",
    "Errors:",
    "Given value type:",
    "Given value:",
    "Not a valid subclass of",
    "Subclass types expect one of",
    "a class path (str)",
    "a dict with",
    "a dict without",
    "Expected a <class 'NoneType'>",
)
# Union-typed config values and their keys, for errors raised while such a value is built.
_UNION_KEYS = {"Callback": "trainer.callbacks", "Logger": "trainer.logger", "LoraSettings": "model.lora"}
_KEY = re.compile(r'Parser key "([^"]+)":\s*(.*)')
_CLASS = re.compile(r"Problem with given class_path '([^']+)':\s*(.*)")
_LITERAL = re.compile(r"Expected a typing\.Literal\[(.*)\]\. Got value: (.*)")
_TYPE = re.compile(r"Expected a <class '(\w+)'>\. Got value: (.*)")
_BOOL_KEY = re.compile(r"Key must be a string, got: (True|False)")
_UNKNOWN_OPTION = re.compile(r"Option '([^']+)' is not accepted")
_NO_ATTRIBUTE = re.compile(r"module '([\w.]+)' has no attribute '(\w+)'")
_REQUIRED = re.compile(r"the following arguments are required: (.*)")
_MISSING_FILE = re.compile(r"File does not exist: '([^']+)'")


def split_debug(args: list[str]) -> tuple[list[str], bool]:
    """The arguments without `--debug`, and whether tracebacks were asked for (flag or SAFEPROJ_DEBUG)."""
    wanted = DEBUG_FLAG in args or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    return [a for a in args if a != DEBUG_FLAG], wanted


def user_errors() -> tuple[type[BaseException], ...]:
    """What bad input raises: parse failures, value and file errors, misconfiguration, a judge that cannot work."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from safeproj.eval.judges.base import JudgeError

    return ArgumentError, ValueError, OSError, MisconfigurationException, JudgeError


@contextmanager
def one_line_errors(prog: str, debug: bool = False) -> Iterator[None]:
    """Bad input inside the block ends the program with `<prog>: error: <one line>` on stderr."""
    try:
        yield
    except user_errors() as err:
        if debug:
            raise
        raise SystemExit(f"{prog}: error: {explain(err, prog)}") from None


def explain(err: BaseException, prog: str = "safeproj") -> str:
    """One line for `err`: jsonargparse's nested reports reduced to the key, the value and the fix."""
    text = str(err)
    if isinstance(err, ArgumentError) or "Union subtypes" in text or text.startswith("Parser key"):
        return explain_parse_error(text, prog)
    if isinstance(err, UnicodeDecodeError):
        return f"not UTF-8 text ({err.reason} at byte {err.start}): save the file as UTF-8"
    return _one_line(text) or type(err).__name__


def explain_parse_error(text: str, prog: str = "safeproj") -> str:
    """The key path, the class it concerns and the first real complaint of a jsonargparse error report."""
    keys: list[str] = []
    class_path = None
    details: list[str] = []
    for raw in text.splitlines():
        line = raw.strip().removeprefix("- ").strip()
        while True:
            if match := _KEY.match(line):
                keys.append(match[1])
                line = match[2]
            elif match := _CLASS.match(line):
                class_path = class_path or match[1]
                line = match[2]
            else:
                break
        if line and not line.startswith(_NOISE):
            details.append(line)
    if not keys:
        # An error raised while building a union-typed value names no key: the subtypes tell which.
        keys = [key for subtype, key in _UNION_KEYS.items() if f".{subtype}'" in text or f".{subtype}]" in text][:1]
    detail = details[0] if details else _one_line(text)
    return _rewrite(detail, keys, class_path, prog)


def _rewrite(detail: str, keys: list[str], class_path: str | None, prog: str) -> str:
    """The leaf complaint in words a user acts on, after the config key (and class) it concerns."""
    outer = f"{keys[0]}: " if keys else ""
    if class_path is None:
        prefix = f"{'.'.join(keys)}: " if keys else ""
    else:
        owner = ".".join([class_path.rsplit(".", 1)[-1], *keys[1:]])
        prefix = f"{keys[0]} {owner}: " if keys else f"{owner}: "
    if match := _LITERAL.match(detail):
        allowed = ", ".join(choice.strip().strip("'\"") for choice in match[1].split(","))
        return f"{prefix}{match[2]!r} is not one of {allowed}"
    if match := _TYPE.match(detail):
        return f"{prefix}{match[2]!r} is not a valid {match[1]}"
    if match := _BOOL_KEY.match(detail):
        if match[1] == "True":
            return f'{prefix}a key was read as true: write the key as "on": YAML reads a bare on as true'
        return f'{prefix}a key was read as false: quote keys such as "off" or "no": YAML reads them as false'
    if match := _UNKNOWN_OPTION.match(detail):
        known = _parameters(class_path)
        hint = _did_you_mean(match[1], known) or (f"; accepted: {', '.join(known)}" if known else "")
        return f"{prefix}unknown argument {match[1]!r}{hint}"
    if match := _NO_ATTRIBUTE.match(detail):
        hint = _did_you_mean(match[2], _public_names(match[1]))
        return f"{outer}unknown class {match[1]}.{match[2]}{hint}"
    if match := _MISSING_FILE.match(detail):
        option = f"--{keys[-1]}: " if keys == ["config"] else prefix
        return f"{option}file not found: {match[1]}"
    if detail.startswith("unrecognized arguments"):
        return f"{detail} (see `{prog} --help`)"
    if match := _REQUIRED.match(detail):
        return f"missing required argument: {match[1]} (see `{prog} --help`)"
    return f"{prefix}{detail}"


def _did_you_mean(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _parameters(class_path: str | None) -> list[str]:
    if not class_path:
        return []
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return []
    return [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")]


def _public_names(module: str) -> list[str]:
    try:
        found = importlib.import_module(module)
    except ImportError:
        return []
    return [n for n in getattr(found, "__all__", dir(found)) if not n.startswith("_")]


def _one_line(text: str) -> str:
    return " ".join(text.split())
