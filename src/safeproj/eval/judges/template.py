"""Judge prompt templates as data: built-in `paper` and `qi2023`, or any user file.

A template file is the judge's single user message with the placeholders `{prompt}` (the harmful
instruction) and `{response}` (the model's answer). It may open with a comment block between two
lines of `---` (provenance, notes); that block is not sent. Other braces are left alone, so policy
text and user files need no escaping. The template's SHA-256 is part of every cache key, so editing
a template re-asks every pair it judged.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path

BUILTIN_TEMPLATES = ("paper", "qi2023")
_PLACEHOLDER = re.compile(r"\{(prompt|response)\}")
_FRONT_MATTER = re.compile(r"\A---\n.*?\n---\n", re.DOTALL)


@dataclass(frozen=True)
class JudgeTemplate:
    """A named judge prompt; `render(prompt, response)` fills it, `sha256` identifies its text."""

    name: str
    text: str

    def __post_init__(self):
        missing = {"prompt", "response"} - set(_PLACEHOLDER.findall(self.text))
        if missing:
            raise ValueError(
                f"judge template {self.name!r} lacks the placeholder(s) "
                + ", ".join("{" + m + "}" for m in sorted(missing))
            )

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    @property
    def label(self) -> str:
        """Name and short hash, e.g. "paper@3f2a9c1d": which template, and which version of it."""
        return f"{self.name}@{self.sha256[:8]}"

    def render(self, prompt: str, response: str) -> str:
        # One pass, so a response that itself contains "{prompt}" is not filled in again.
        values = {"prompt": prompt, "response": response}
        return _PLACEHOLDER.sub(lambda m: values[m.group(1)], self.text)

    @classmethod
    def load(cls, spec: str) -> JudgeTemplate:
        """A built-in template by name ("paper", "qi2023") or a template file by path."""
        if spec in BUILTIN_TEMPLATES:
            text = resources.files("safeproj.eval.judges").joinpath("templates", f"{spec}.txt").read_text("utf-8")
            return cls(spec, _FRONT_MATTER.sub("", text, count=1))
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ValueError(
                f"judge template {spec!r} is neither a built-in ({', '.join(BUILTIN_TEMPLATES)}) nor an existing file"
            )
        return cls(path.stem, _FRONT_MATTER.sub("", path.read_text("utf-8"), count=1))
