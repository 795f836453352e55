"""Subspace specs: where a basis comes from, resolved against presets and the basis cache.

A subspace spec is one of:
- a basis artifact (`*.safetensors` written by `safeproj basis` or `Basis.save`);
- `safety:<preset>`: Δ_S of a preset, its safety-tuned version minus itself (`safeproj prereq <preset>`
  makes the safety-tuned version; the command line makes it on first use);
- `safety`: Δ_S of the preset the run starts from (`<preset>` or `<preset>-safety`);
- any delta spec of `safeproj.core.deltas.delta_from_spec` (`TUNED,BASE` checkpoints, a LoRA adapter, a
  finished run), from which a basis is built once and cached under the safeproj cache directory.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from filelock import FileLock
from lightning.pytorch.utilities import rank_zero_info

from safeproj.core.basis import Basis, build_basis
from safeproj.core.deltas import CheckpointDelta, DeltaSource, delta_from_spec
from safeproj.core.options import BasisOptions
from safeproj.model.loading import PRESETS, cache_dir, resolve, safety_tuned_dir


def expand_spec(spec: str, model_name: str | None) -> str:
    """`safety` -> `safety:<preset>` for the preset a run starts from."""
    if spec != "safety":
        return spec
    preset = (model_name or "").removesuffix("-safety")
    if preset not in PRESETS:
        raise ValueError(
            f"subspace 'safety' needs a run that starts from a preset ({', '.join(PRESETS)} or <preset>-safety), "
            f"not {model_name!r}; name the delta instead (e.g. 'safety:smollm2-135m' or 'TUNED,BASE')"
        )
    return f"safety:{preset}"


def delta_source(spec: str, include=None, exclude=None) -> DeltaSource:
    """A delta spec, with `safety:<preset>` meaning Δ_S of that preset."""
    if spec.startswith("safety:"):
        preset = spec.split(":", 1)[1]
        return CheckpointDelta(str(safety_tuned_dir(preset)), resolve(preset), include=include, exclude=exclude)
    return delta_from_spec(spec, include=include, exclude=exclude)


def resolve_basis(spec: str, options: BasisOptions, progress: bool = True) -> Basis:
    """Load a basis artifact, or build (and cache) one from a delta spec."""
    if spec.endswith(".safetensors"):
        if not Path(spec).is_file():
            raise FileNotFoundError(f"basis file {spec} does not exist")
        return Basis.load(spec)
    source = delta_source(spec, options.include, options.exclude)
    key = hashlib.sha256(
        json.dumps({"source": source.describe(), "options": options.as_dict()}, sort_keys=True).encode()
    ).hexdigest()[:16]
    path = cache_dir() / "bases" / f"{key}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not path.is_file():
            rank_zero_info(f"Building basis from {spec} ({options.as_dict()}) -> {path}")
            basis = build_basis(
                source,
                frac=options.frac,
                eta=options.eta,
                selection=options.selection,
                side=options.side,
                seed=options.seed,
                progress=progress,
            )
            basis.save(path)
    return Basis.load(path)
