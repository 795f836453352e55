"""gather_rows: every rank's share of the items, back in the original order."""

from __future__ import annotations

import torch

from safeproj.eval.ranks import gather_rows


def test_one_process_keeps_its_rows():
    rows = [{"i": 0}, {"i": 1}]
    assert gather_rows(rows, world_size=1) is rows


def test_shares_of_uneven_size_interleave_back_into_item_order(monkeypatch):
    items = [{"i": i} for i in range(7)]
    shares = [items[rank::3] for rank in range(3)]  # rank r held items r, r + 3, r + 6

    def all_gather_object(parts, rows):
        parts[:] = shares

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_gather_object", all_gather_object)
    assert gather_rows(shares[0], world_size=3) == items
