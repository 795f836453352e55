"""Content-addressed sqlite store of judgments, safe for concurrent writers (WAL, one commit each).

The key is a hash of everything that changes the judge's answer: the model, the rendered messages
(so the template text), the sampling parameters and the format reminder. Only scored judgments are
final: a NaN (failed request, unparsable answer) is recorded with its reason but never overwrites a
score, and a judge asks again for it on the next run unless told not to.
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
import time
from pathlib import Path

from safeproj.eval.judges.base import Judgment


class JudgeCache:
    """`get(key)` / `put(key, judgment, ...)` over one sqlite file; usable as a context manager."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One thread at a time, but not always the opening one (a judge called inside a running event
        # loop judges on a thread of its own).
        self._db = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # In WAL mode NORMAL still makes each commit survive a crash of this process; it only skips
        # the per-commit fsync (about 10 ms) that guards against power loss.
        self._db.execute("PRAGMA synchronous=NORMAL")
        # judge_model: the model asked; rubric: the template's name@hash (both for people reading the file).
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS judgments (key TEXT PRIMARY KEY, score REAL, reason TEXT, raw TEXT, "
            "finish_reason TEXT, failure TEXT, judge_model TEXT, rubric TEXT, created REAL)"
        )
        self._db.commit()

    @staticmethod
    def key(request: dict) -> str:
        """SHA-256 of a request description (model, messages, sampling parameters...), key order ignored."""
        payload = json.dumps(request, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def get(self, key: str) -> Judgment | None:
        """The stored judgment (NaN ones included, with their failure and reason), or None."""
        row = self._db.execute(
            "SELECT score, reason, raw, finish_reason, failure FROM judgments WHERE key = ?", (key,)
        ).fetchone()
        if row is None:
            return None
        score, reason, raw, finish_reason, failure = row
        return Judgment(
            score=math.nan if score is None else score,
            reason=reason,
            raw=raw,
            finish_reason=finish_reason,
            cached=True,
            failure=failure,
        )

    def put(self, key: str, judgment: Judgment, judge_model: str = "", rubric: str = "") -> None:
        """Store a judgment; a NaN never replaces a stored score (another run may have found it)."""
        score = None if math.isnan(judgment.score) else judgment.score
        self._db.execute(
            "INSERT INTO judgments VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(key) DO UPDATE SET "
            "score = excluded.score, reason = excluded.reason, raw = excluded.raw, "
            "finish_reason = excluded.finish_reason, failure = excluded.failure, "
            "judge_model = excluded.judge_model, rubric = excluded.rubric, created = excluded.created "
            "WHERE judgments.score IS NULL OR excluded.score IS NOT NULL",
            (
                key,
                score,
                judgment.reason,
                judgment.raw,
                judgment.finish_reason,
                judgment.failure,
                judge_model,
                rubric,
                time.time(),
            ),
        )
        self._db.commit()

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM judgments").fetchone()[0]

    def count_final(self) -> int:
        """Judgments with a score (the ones a rerun will not ask for again)."""
        return self._db.execute("SELECT COUNT(*) FROM judgments WHERE score IS NOT NULL").fetchone()[0]

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> JudgeCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
