"""Settings that keep a command's output to what concerns the user: no telemetry, no tokenizer fork
warnings, no advertising tips, no seed notice (the seed is in the saved config), no deprecation notices
that one library raises about another."""

from __future__ import annotations

import logging
import os
import warnings

# Lightning's rank_zero_info lines that advertise other products.
_ADVERTS = ("💡 Tip:",)
# Warnings about library internals a user can do nothing about (Lightning 2.6 on torch's pytree).
_INTERNAL_WARNINGS = (r"`isinstance\(treespec, LeafSpec\)` is deprecated",)


class _DropAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_ADVERTS)


def quiet_defaults() -> None:
    """Environment defaults and log filters for a command-line run (a user's explicit settings win)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("WANDB_SILENT", "true")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        rank_zero = logging.getLogger(name)
        if not any(isinstance(f, _DropAdverts) for f in rank_zero.filters):
            rank_zero.addFilter(_DropAdverts())
    for message in _INTERNAL_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    # "Seed set to 0" would be the only line before an error raised while the classes are built.
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)
