"""Reads an offline W&B run back: the records of its `.wandb` file (a LevelDB-style log of protobuf records)."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

_BLOCK = 32768
_HEADER = 7  # ":W&B", magic 0xBEE1, version
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def records(path: str | Path) -> list:
    """Every `wandb_internal_pb2.Record` in a `.wandb` file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a .wandb file")
    out, pos, pending = [], _HEADER, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            break
        pending = chunk if kind in (_FULL, _FIRST) else pending + chunk
        if kind in (_FULL, _LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


@dataclass
class OfflineRun:
    """What an offline run recorded: identity, config, history rows, summary and artifacts."""

    id: str = ""
    name: str = ""
    group: str = ""
    job_type: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    artifacts: list = field(default_factory=list)

    def series(self, key: str) -> list[tuple[int, float]]:
        """(trainer/global_step, value) of every history row holding `key`."""
        return [(row.get("trainer/global_step"), row[key]) for row in self.history if key in row]


def read_run(wandb_file: str | Path) -> OfflineRun:
    run = OfflineRun()
    for record in records(wandb_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            # A later run record (an update) may leave fields empty: keep what an earlier one set.
            r = record.run
            run.id = r.run_id or run.id
            run.name = r.display_name or run.name
            run.group = r.run_group or run.group
            run.job_type = r.job_type or run.job_type
            run.tags = list(r.tags) or run.tags
            run.config.update({_key(i): json.loads(i.value_json) for i in r.config.update})
        elif kind == "config":
            run.config.update({_key(i): json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            run.history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            run.summary.update({_key(i): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "artifact":
            run.artifacts.append(record.artifact)
    return run


def offline_runs(run_dir: str | Path) -> list[Path]:
    """The `.wandb` files under a run directory, oldest first."""
    return sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
