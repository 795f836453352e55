"""Activation recordings on disk: writing a step, reading it back, analysing all steps, the report.

One folder per recorded step, streamed to safetensors shards so at most `shard_size` rows per layer
are held in memory:

    out_dir/step_{step}/{set}_layer{L}_shard{i}.safetensors   (tensor "activations": rows × hidden)
    out_dir/step_{step}/manifest.json                           (written last: the step is complete)

A step is written into a hidden folder and renamed when complete, so a crash never leaves a
half-written step behind. The statistics are `safeproj.core.activations`; the figures
`safeproj.plots.activations`.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from safeproj.core.activations import DEFAULT_ETAS, analyse_layer, change_rows, direction_cosine
from safeproj.data.prompts import DEFAULT_PROMPT_SETS, check_prompt_sets
from safeproj.io import atomic_dir, atomic_file, write_json
from safeproj.model.activations import POSITIONS, EncodedPrompt, left_pad, record_activations, resolve_layers

STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SHARD_FORMAT = "safeproj.activations/1"
MANIFEST = "manifest.json"
_SHARD = re.compile(r"^(?P<set>[A-Za-z0-9_-]+)_layer(?P<layer>\d+)_shard(?P<shard>\d+)\.safetensors$")
_STEP = re.compile(r"^step_(\d+)$")


@dataclass
class RecordingOptions:
    """What to record and how, checked once for `ActivationRecorder` and `safeproj activations`.

    Args:
        prompt_sets: name → prompt-set spec (see `safeproj.data.prompts`); None: harmful and benign
            requests of the same form (`DEFAULT_PROMPT_SETS`).
        layers: decoder layer indices (int) or shares of depth (float in [0, 1]); None: the 65–90 % band.
        num_prompts: prompts taken from each set.
        position: "last", "mean" or "assistant" (see `safeproj.model.activations`).
        batch_size: prompts per forward pass.
        shard_size: rows per shard file.
        dtype: storage dtype, "float32" or "bfloat16".
    """

    prompt_sets: dict[str, str] | None = None
    layers: list[int | float] | None = None
    num_prompts: int = 128  # per set: the probe's default half held out leaves 64 per class
    position: str = "last"
    batch_size: int = 8
    shard_size: int = 1024
    dtype: str = "float32"

    def __post_init__(self) -> None:
        self.prompt_sets = dict(DEFAULT_PROMPT_SETS if self.prompt_sets is None else self.prompt_sets)
        check_prompt_sets(self.prompt_sets)
        if self.layers is not None:
            resolve_layers(self.layers, depth=10**9)  # shape checks only; the range needs the model
        if self.position not in POSITIONS:
            raise ValueError(f"position must be one of {POSITIONS}, got {self.position!r}")
        if self.dtype not in STORAGE_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(STORAGE_DTYPES)}, got {self.dtype!r}")
        for name in ("num_prompts", "batch_size", "shard_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


# --------------------------------------------------------------------------------------------
# Writing


class ShardWriter:
    """Rows of one (prompt set, layer): buffered and written as a shard every `shard_size` rows."""

    def __init__(self, directory: Path, set_name: str, layer: int, metadata: Mapping[str, str], shard_size: int):
        self.directory = Path(directory)
        self.set_name = set_name
        self.layer = layer
        self.metadata = dict(metadata)
        self.shard_size = shard_size
        self.paths: list[Path] = []
        self.rows_written = 0
        self.bytes_written = 0
        self.max_buffered = 0  # the most rows ever held at once; never above shard_size
        self._rows: list[torch.Tensor] = []
        self._ids: list[int] = []

    @property
    def buffered(self) -> int:
        return len(self._ids)

    def add(self, rows: torch.Tensor, prompt_ids: Sequence[int]) -> None:
        if rows.shape[0] != len(prompt_ids):
            raise ValueError(f"{rows.shape[0]} rows but {len(prompt_ids)} prompt ids")
        start = 0
        while start < len(prompt_ids):
            take = min(self.shard_size - self.buffered, len(prompt_ids) - start)
            self._rows.append(rows[start : start + take])
            self._ids.extend(int(i) for i in prompt_ids[start : start + take])
            self.max_buffered = max(self.max_buffered, self.buffered)
            start += take
            if self.buffered >= self.shard_size:
                self.flush()

    def flush(self) -> None:
        if not self._ids:
            return
        tensor = torch.cat(self._rows).contiguous()
        path = self.directory / f"{self.set_name}_layer{self.layer}_shard{len(self.paths)}.safetensors"
        metadata = {**self.metadata, "shard": str(len(self.paths)), "prompt_ids": json.dumps(self._ids)}
        with atomic_file(path) as tmp:
            save_file({"activations": tensor}, str(tmp), metadata=metadata)
        self.paths.append(path)
        self.rows_written += len(self._ids)
        self.bytes_written += path.stat().st_size
        self._rows, self._ids = [], []


@dataclass
class StepRecord:
    """What one recording wrote."""

    directory: Path
    step: int
    rows: dict[str, int]
    shards: int
    bytes_written: int
    payload_bytes: int  # rows × layers × hidden × dtype size, without safetensors headers
    max_buffered_rows: int


def record_step(
    model: nn.Module,
    prompt_sets: Mapping[str, Sequence[EncodedPrompt]],
    layers: Sequence[int],
    out_dir: str | os.PathLike,
    step: int,
    *,
    position: str,
    pad_id: int,
    batch_size: int = 8,
    shard_size: int = 1024,
    dtype: str = "float32",
    progress: bool = True,
) -> StepRecord:
    """Record every prompt set at `layers` into `out_dir/step_{step}/`, replacing an older one."""
    torch_dtype = _storage_dtype(dtype)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / f"step_{step}"
    rows: dict[str, int] = {}
    writers: list[ShardWriter] = []
    hidden = 0
    with atomic_dir(final) as partial, record_activations(model, layers, torch_dtype) as capture:
        for set_name, encoded in prompt_sets.items():
            meta = {"format": SHARD_FORMAT, "step": str(step), "set": set_name, "position": position, "dtype": dtype}
            set_writers = {
                layer: ShardWriter(partial, set_name, layer, {**meta, "layer": str(layer)}, shard_size)
                for layer in layers
            }
            desc = f"activations step {step} {set_name}"
            for ids, captured in _captured_batches(capture, encoded, pad_id, batch_size, desc, progress):
                for layer, writer in set_writers.items():
                    hidden = captured[layer].shape[-1]
                    writer.add(captured[layer], ids)
            for writer in set_writers.values():
                writer.flush()
            writers += set_writers.values()
            rows[set_name] = len(encoded)
        manifest = {
            "format": SHARD_FORMAT,
            "step": step,
            "layers": list(layers),
            "position": position,
            "dtype": dtype,
            "hidden_size": hidden,
            "sets": rows,
            "shards": sorted(p.name for w in writers for p in w.paths),
        }
        groups = {name: [e.group for e in encoded] for name, encoded in prompt_sets.items()}
        groups = {name: g for name, g in groups.items() if g and all(x is not None for x in g)}
        if groups:
            manifest["groups"] = groups
        write_json(partial / MANIFEST, manifest)
    item = torch.empty((), dtype=torch_dtype).element_size()
    return StepRecord(
        directory=final,
        step=step,
        rows=rows,
        shards=sum(len(w.paths) for w in writers),
        bytes_written=sum(w.bytes_written for w in writers),
        payload_bytes=sum(rows.values()) * len(layers) * hidden * item,
        max_buffered_rows=max((w.max_buffered for w in writers), default=0),
    )


def run_recording_forwards(
    model: nn.Module,
    prompt_sets: Mapping[str, Sequence[EncodedPrompt]],
    layers: Sequence[int],
    *,
    pad_id: int,
    batch_size: int = 8,
    dtype: str = "float32",
) -> None:
    """The forward calls `record_step` makes with the same arguments, keeping and writing nothing.

    A model sharded with FSDP2 runs a forward only when every process does: the processes that do not
    write run this while one runs `record_step`.
    """
    with record_activations(model, layers, _storage_dtype(dtype)) as capture:
        for encoded in prompt_sets.values():
            for _ in _captured_batches(capture, encoded, pad_id, batch_size, "", progress=False):
                pass


def _storage_dtype(dtype: str) -> torch.dtype:
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
    return STORAGE_DTYPES[dtype]


def _captured_batches(
    capture, encoded: Sequence[EncodedPrompt], pad_id: int, batch_size: int, desc: str, progress: bool
) -> Iterator[tuple[list[int], dict[int, torch.Tensor]]]:
    """(prompt ids, {layer: rows}) of each batch of one prompt set, in order."""
    starts = range(0, len(encoded), batch_size)
    for start in tqdm(starts, desc=desc, leave=False, disable=not progress):
        chunk = encoded[start : start + batch_size]
        yield list(range(start, start + len(chunk))), capture(left_pad(chunk, pad_id))


# --------------------------------------------------------------------------------------------
# Reading


def recorded_steps(out_dir: str | os.PathLike) -> list[int]:
    """Steps with a complete recording (a manifest) under `out_dir`, ascending."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    steps = []
    for child in out_dir.iterdir():
        match = _STEP.match(child.name)
        if match and (child / MANIFEST).is_file():
            steps.append(int(match.group(1)))
    return sorted(steps)


def step_manifest(out_dir: str | os.PathLike, step: int) -> dict:
    path = Path(out_dir) / f"step_{step}" / MANIFEST
    if not path.is_file():
        raise ValueError(f"no complete recording for step {step}: {path} is missing")
    return json.loads(path.read_text(encoding="utf-8"))


def load_activations(
    out_dir: str | os.PathLike, step: int, set_name: str, layer: int
) -> tuple[torch.Tensor, list[int]]:
    """(rows × hidden fp32, prompt ids) of one prompt set at one layer, rows ordered by prompt id."""
    step_dir = Path(out_dir) / f"step_{step}"
    shards = []
    for path in step_dir.glob(f"{set_name}_layer{layer}_shard*.safetensors"):
        match = _SHARD.match(path.name)
        if match and match.group("set") == set_name and int(match.group("layer")) == layer:
            shards.append((int(match.group("shard")), path))
    if not shards:
        raise ValueError(f"no activations for set {set_name!r}, layer {layer} in {step_dir}")
    tensors, ids = [], []
    for _, path in sorted(shards):
        with safe_open(str(path), framework="pt") as handle:
            ids += json.loads(handle.metadata()["prompt_ids"])
            tensors.append(handle.get_tensor("activations").float())
    rows = torch.cat(tensors)
    order = sorted(range(len(ids)), key=ids.__getitem__)
    return rows[order], [ids[i] for i in order]


# --------------------------------------------------------------------------------------------
# Analysis of every step, and its report


def analyse_recordings(
    out_dir: str | os.PathLike,
    steps: Sequence[int] | None = None,
    etas: Sequence[float] = DEFAULT_ETAS,
    basis=None,
    harmful_set: str = "harmful",
    benign_set: str = "benign",
    seed: int = 0,
    probe_test_size: float = 0.5,
    prompt_groups: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, list[dict]]:
    """Analyse every (step, layer) recorded under `out_dir`; loads one layer of one step at a time.

    `harmful_set` is contrasted with `benign_set`; the probe is scored on a `probe_test_size` share of
    each, holding out whole groups (acts) where the recording names them, or else `prompt_groups` gives
    them for every prompt of both sets (for recordings made before groups were kept). Returns {"mso": rows per (step, layer, centered, η), "layers": one row per (step, layer),
    "changes": first vs last step per (layer, metric)}.
    """
    available = recorded_steps(out_dir)
    steps = available if steps is None else sorted(int(s) for s in steps)
    missing = [s for s in steps if s not in available]
    if missing:
        raise ValueError(f"steps {missing} have no complete recording in {out_dir} (have {available})")
    if not steps:
        raise ValueError(f"no recorded steps in {out_dir}")
    mso_rows: list[dict] = []
    layer_rows: list[dict] = []
    first_direction: dict[int, torch.Tensor] = {}
    for step in steps:
        manifest = step_manifest(out_dir, step)
        for name in (harmful_set, benign_set):
            if name not in manifest["sets"]:
                raise ValueError(
                    f"step {step} has no prompt set {name!r}; recorded sets are {sorted(manifest['sets'])}"
                )
        for layer in manifest["layers"]:
            harmful, harmful_ids = load_activations(out_dir, step, harmful_set, layer)
            benign, benign_ids = load_activations(out_dir, step, benign_set, layer)
            groups = _probe_groups(manifest, prompt_groups, (harmful_set, harmful_ids), (benign_set, benign_ids))
            rows, row, direction = analyse_layer(harmful, benign, etas, basis, layer, seed, probe_test_size, groups)
            first_direction.setdefault(layer, direction)
            key = {"step": step, "layer": layer}
            mso_rows += [{**key, **r} for r in rows]
            drift = direction_cosine(direction, first_direction[layer])
            layer_rows.append({**key, **row, "direction_cosine_to_first": drift})
    return {"mso": mso_rows, "layers": layer_rows, "changes": change_rows(layer_rows, mso_rows)}


def _probe_groups(
    manifest: Mapping, given: Mapping[str, Sequence[str]] | None, *sets: tuple[str, Sequence[int]]
) -> tuple[list[str], ...] | None:
    """Each set's prompt groups in row order: the recording's, else `given` where it covers every recorded
    prompt of every set; None when neither does."""
    for source in (manifest.get("groups") or {}, given or {}):
        if all(name in source and len(source[name]) == manifest["sets"][name] for name, _ in sets):
            return tuple([source[name][i] for i in ids] for name, ids in sets)
    return None


def write_report(report: Mapping[str, Sequence[Mapping]], out_dir: str | os.PathLike) -> dict[str, Path]:
    """analysis.json plus mso_vs_eta.png and probe_by_layer.png under `out_dir`."""
    from safeproj.plots.activations import plot_layers, plot_mso  # matplotlib only when reporting

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"analysis": out_dir / "analysis.json"}
    write_json(files["analysis"], {k: list(v) for k, v in report.items()}, default=_json_value)
    if report.get("mso"):
        files["mso_vs_eta"] = plot_mso(report["mso"], out_dir / "mso_vs_eta.png")
    if report.get("layers"):
        files["probe_by_layer"] = plot_layers(report["layers"], out_dir / "probe_by_layer.png")
    return files


def _json_value(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def summary_table(report: Mapping[str, Sequence[Mapping]], eta: float = 0.5) -> str:
    """A plain-text table, one line per (step, layer): held-out probe accuracy with its n, the
    difference-of-means norm, and the uncentered and centered MSO at `eta`, each with its random baseline."""
    mso = {(r["step"], r["layer"], r["centered"]): r for r in report["mso"] if math.isclose(r["eta"], eta)}
    at = format(eta, "g")
    header = (
        f"{'step':>6} {'layer':>5} {'probe':>6} {'n_test':>6} {'diff_norm':>10} "
        f"{'mso@' + at:>8} {'random':>7} {'centered':>8} {'random':>7}"
    )
    extra = sorted({k for r in report["layers"] for k in r if k.startswith("cos_")})
    header += "".join(f" {k:>14}" for k in extra)
    lines = [header]
    nan = math.nan
    for r in report["layers"]:
        plain = mso.get((r["step"], r["layer"], False), {})
        centered = mso.get((r["step"], r["layer"], True), {})
        line = (
            f"{r['step']:>6} {r['layer']:>5} {r['probe_accuracy']:>6.3f} {r.get('probe_n_test', 0):>6} "
            f"{r['diff_norm']:>10.4g} {plain.get('mso', nan):>8.3f} {plain.get('baseline', nan):>7.3f} "
            f"{centered.get('mso', nan):>8.3f} {centered.get('baseline', nan):>7.3f}"
        )
        for k in extra:
            rand = r.get(k.replace("cos_", "random_"), nan)
            line += f" {r.get(k, nan):>6.3f}/{rand:<7.3f}"
        lines.append(line)
    return "\n".join(lines)
