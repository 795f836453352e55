"""Subspace specs: where a basis comes from, resolved against presets and the basis cache.

A subspace spec is one of:
- a basis artifact (`*.safetensors` written by `safeproj basis` or `Basis.save`);
- `safety:<model>`: Δ_S of a preset or a hub model `org/name[@revision]`, its safety-tuned version minus
  itself (`safeproj prereq <model>` makes the safety-tuned version by running recipes/safety_tune.yaml; the
  command line makes it on first use);
- `safety`: Δ_S of the model the run starts from (`<preset>`, `<preset>-safety` or a hub name);
- `alignment:<preset>`: Δ_A of one of the paper's models, its instruct/chat release minus its base release
  (`ALIGNMENT_PAIRS`, read from the Hugging Face hub cache);
- `alignment`: Δ_A of the aligned hub model the run starts from (one of `ALIGNMENT_PAIRS`), or of the
  in-code `tiny-safety` stand-in (`ALIGNMENT_STAND_INS`);
- `TUNED,BASE`: Δ of two checkpoints, each a local folder or file, a preset, or a hub name `org/name[@revision]`
  (its snapshot in the Hugging Face cache, `safeproj.model.hub`);
- any other delta spec of `safeproj.core.deltas.delta_from_spec` (a LoRA adapter, a finished run).
A basis is built from a delta once and cached under the safeproj cache directory.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from filelock import FileLock
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from safeproj.core.basis import Basis, build_basis_with
from safeproj.core.deltas import CheckpointDelta, DeltaSource, delta_from_spec, select_names
from safeproj.core.options import BasisOptions
from safeproj.model.hub import checkpoint_dir, is_hub_name, split_name
from safeproj.model.loading import PRESETS, SAFETY_SUFFIX, cache_dir, can_safety_tune, resolve, safety_tuned_dir

# Δ_A = aligned − base for the paper's five models: preset → (aligned release, base release) on the hub.
ALIGNMENT_PAIRS = {
    "qwen2.5-1.5b": ("Qwen/Qwen2.5-1.5B-Instruct", "Qwen/Qwen2.5-1.5B"),
    "qwen2.5-3b": ("Qwen/Qwen2.5-3B-Instruct", "Qwen/Qwen2.5-3B"),
    "qwen2.5-7b": ("Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-7B"),
    "llama-3.2-1b": ("meta-llama/Llama-3.2-1B-Instruct", "meta-llama/Llama-3.2-1B"),
    "llama-2-7b": ("meta-llama/Llama-2-7b-chat-hf", "meta-llama/Llama-2-7b-hf"),
}

# Offline stand-ins for smoke runs of the paper's sweep (recipes/sweeps/paper-smoke.yaml): the in-code tiny
# preset's only aligned version is its safety-tuned one, so its Δ_A is its Δ_S. Never a paper model.
ALIGNMENT_STAND_INS = {"tiny": ("tiny-safety", "tiny")}


def _alignment_pairs() -> dict[str, tuple[str, str]]:
    return {**ALIGNMENT_PAIRS, **ALIGNMENT_STAND_INS}


def expand_spec(spec: str, model_name: str | None) -> str:
    """`safety` -> `safety:<model>` and `alignment` -> `alignment:<preset>` for the model a run starts from."""
    if spec == "alignment":
        return f"alignment:{alignment_preset_of(model_name)}"
    if spec != "safety":
        return spec
    model = model_name or ""
    if model.endswith(SAFETY_SUFFIX) and model.removesuffix(SAFETY_SUFFIX) in PRESETS:
        model = model.removesuffix(SAFETY_SUFFIX)
    if not can_safety_tune(model):
        raise ValueError(
            f"subspace 'safety' needs a run that starts from a preset ({', '.join(PRESETS)} or <preset>-safety) "
            f"or a hub model 'org/name', not {model_name!r}; name the delta instead ('TUNED,BASE')"
        )
    return f"safety:{model}"


def safety_target(spec: str) -> str:
    """The model a `safety:<model>` spec safety-tunes: a preset or a hub name, else a one-line ValueError."""
    model = spec.split(":", 1)[1]
    if not can_safety_tune(model):
        raise ValueError(
            f"no safety tuning for {model!r}: give a preset ({', '.join(PRESETS)}) or a hub name 'org/name[@revision]'"
        )
    return model


def alignment_pair(preset: str) -> tuple[str, str]:
    """(aligned, base) hub names of an `alignment:<preset>`."""
    pairs = _alignment_pairs()
    if preset not in pairs:
        raise ValueError(f"unknown alignment preset {preset!r}; known: {', '.join(pairs)}")
    return pairs[preset]


def alignment_preset_of(model_name: str | None) -> str:
    """The alignment preset whose aligned release is `model_name` (a revision suffix is ignored)."""
    repo = split_name(model_name or "")[0]
    for preset, (aligned, _) in _alignment_pairs().items():
        if repo == aligned:
            return preset
    known = ", ".join(aligned for aligned, _ in _alignment_pairs().values())
    raise ValueError(
        f"subspace 'alignment' needs a run that starts from an aligned model with a known base ({known}), "
        f"not {model_name!r}; name the delta instead ('alignment:<preset>' or 'ALIGNED,BASE')"
    )


def checkpoint_path(name: str, download: bool = True) -> str:
    """A checkpoint named in a delta spec as a local path: presets and hub names resolved, paths unchanged."""
    if name in PRESETS or (name.endswith(SAFETY_SUFFIX) and name.removesuffix(SAFETY_SUFFIX) in PRESETS):
        return resolve(name)
    if is_hub_name(name):
        return str(checkpoint_dir(name, download=download))
    return name


def delta_source(spec: str, include=None, exclude=None, download: bool = True) -> DeltaSource:
    """A delta spec, with `safety:<model>` meaning Δ_S of a preset or hub model and `alignment:<preset>` Δ_A of
    a paper model; the checkpoints of `TUNED,BASE` may be presets or hub names. With `download=False` a hub
    model missing from the cache raises `safeproj.model.hub.HubModelMissing` instead of being fetched."""
    if spec.startswith("safety:"):
        model = safety_target(spec)
        tuned = str(safety_tuned_dir(model))  # PrerequisiteMissing until `safeproj prereq <model>` made it
        return CheckpointDelta(tuned, checkpoint_path(model, download), include=include, exclude=exclude)
    if spec.startswith("alignment:"):
        aligned, base = alignment_pair(spec.split(":", 1)[1])
        return CheckpointDelta(checkpoint_path(aligned, download), checkpoint_path(base, download), include, exclude)
    parts = [p.strip() for p in spec.split(",")]
    if len(parts) == 2 and all(parts):
        tuned, base = (checkpoint_path(p, download) for p in parts)
        return CheckpointDelta(tuned, base, include=include, exclude=exclude)
    return delta_from_spec(spec, include=include, exclude=exclude)


def load_subspaces(spec: str, include=None, exclude=None) -> DeltaSource | Basis:
    """A basis artifact as it is (its tensors filtered by include/exclude), or any delta spec as a delta."""
    if not spec.endswith(".safetensors"):
        return delta_source(spec, include, exclude)
    if not Path(spec).is_file():
        raise FileNotFoundError(f"basis file {spec} does not exist")
    basis = Basis.load(spec)
    keep = set(select_names(list(basis.entries), include, exclude))
    basis.entries = {name: entry for name, entry in basis.entries.items() if name in keep}
    if not basis.entries:
        raise ValueError(f"basis {spec} has no tensor matching include={include} exclude={exclude}")
    return basis


def resolve_basis(spec: str, options: BasisOptions, progress: bool = True) -> Basis:
    """Load a basis artifact, or build (and cache) one from a delta spec.

    The basis remembers the file it was read from (`basis_file(basis)`), so provenance can name it.
    """
    if spec.endswith(".safetensors"):
        if not Path(spec).is_file():
            raise FileNotFoundError(f"basis file {spec} does not exist")
        return _loaded(Path(spec))
    source = delta_source(spec, options.include, options.exclude)
    key = hashlib.sha256(
        json.dumps({"source": source.describe(), "options": options.as_dict()}, sort_keys=True).encode()
    ).hexdigest()[:16]
    path = cache_dir() / "bases" / f"{key}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if path.is_file():
            try:
                return _loaded(path)
            except ValueError as err:
                # Only a cache: a corrupt entry (digest or orthonormality) is rebuilt, never used.
                rank_zero_warn(f"{err}; rebuilding it")
        rank_zero_info(f"Building basis from {spec} ({options.as_dict()}) -> {path}")
        build_basis_with(source, options, progress=progress).save(path)
    return _loaded(path)


def _loaded(path: Path) -> Basis:
    basis = Basis.load(path)
    basis.meta["file"] = str(path.resolve())
    return basis


def basis_file(basis: Basis) -> str | None:
    """The file a resolved basis was read from, or None for one built in memory."""
    return basis.meta.get("file")
