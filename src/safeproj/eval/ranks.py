"""Evaluation split across ranks: rank r takes items r, r + world, r + 2·world, ...; rows come back in order."""

from __future__ import annotations

from typing import Any

import torch


def gather_rows(rows: list[dict], world_size: int) -> list[dict]:
    """All ranks' per-sample rows in the original item order (each rank passes its own share)."""
    if world_size == 1 or not torch.distributed.is_initialized():
        return rows
    parts: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(parts, rows)
    ordered = []
    for i in range(max(len(p) for p in parts)):
        ordered += [p[i] for p in parts if i < len(p)]
    return ordered
