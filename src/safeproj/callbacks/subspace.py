"""What projection callbacks share: finding a subspace from a spec, and matching it to parameters.

A subspace spec is one of:
- a basis artifact (`*.safetensors` written by `safeproj basis` or `Basis.save`);
- `safety:<preset>`: Δ_S of a preset, its safety-tuned version minus itself (made and cached on first use);
- `safety`: Δ_S of the preset the run starts from (`<preset>` or `<preset>-safety`);
- any delta spec of `safeproj.core.deltas.delta_from_spec` (`TUNED,BASE` checkpoints, a LoRA adapter, a
  finished run), from which a basis is built once and cached under the safeproj cache directory.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from lightning.pytorch.utilities import rank_zero_info

from safeproj.core.basis import Basis, build_basis
from safeproj.core.deltas import CheckpointDelta, DeltaSource, delta_from_spec
from safeproj.model.loading import cache_dir, resolve

KEEPS = ("parallel", "orthogonal")


@dataclass
class BasisOptions:
    """How to build a basis from a delta: exactly one of frac / eta."""

    frac: float | None = 0.5
    eta: float | None = None
    selection: str = "top"
    side: str = "left"
    seed: int = 0
    include: list[str] | None = None
    exclude: list[str] | None = None

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("frac", "eta", "selection", "side", "seed", "include", "exclude")}


def check_rank_choice(owner: str, frac: float | None, eta: float | None) -> tuple[float | None, float | None]:
    """(frac, eta) with eta winning when both are set; MisconfigurationException naming `owner` if invalid."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from safeproj.core.spectrum import k_for_energy, k_for_frac

    if eta is not None:
        frac = None
    try:
        if frac is not None:
            k_for_frac(frac, 1, 1)
        elif eta is not None:
            k_for_energy(torch.ones(1), eta)
        else:
            raise ValueError("give frac or eta")
    except ValueError as err:
        raise MisconfigurationException(f"{owner}: {err}") from None
    return frac, eta


def expand_spec(spec: str, model_name: str | None) -> str:
    """`safety` -> `safety:<preset>` for the preset a run starts from."""
    if spec != "safety":
        return spec
    from safeproj.model.loading import PRESETS

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
        from safeproj.model.prereq import safety_tuned_dir

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


def hf_name(name: str) -> str:
    """A parameter or module name inside a (possibly PEFT-wrapped) HF model -> the plain HF name."""
    if name.startswith("base_model.model."):
        name = name[len("base_model.model.") :]
    return name.replace(".base_layer", "")


@dataclass
class Target:
    """A weight that a basis entry governs: a plain parameter, or a LoRA pair (B: out×r, A: r×in)."""

    name: str
    weight: torch.nn.Parameter | None = None
    lora_a: torch.nn.Parameter | None = None
    lora_b: torch.nn.Parameter | None = None
    scaling: float = 1.0

    @property
    def is_lora(self) -> bool:
        return self.lora_a is not None

    def delta_weight(self) -> torch.Tensor:
        """ΔW of a LoRA pair, scale·B·A, in fp32."""
        return self.scaling * (self.lora_b.float() @ self.lora_a.float())


def model_weights(model: torch.nn.Module) -> tuple[dict[str, Target], dict[str, tuple]]:
    """Every weight by its plain HF name (LoRA pairs where adapters exist), and the HF shapes."""
    shapes: dict[str, tuple] = {}
    weights: dict[str, Target] = {}
    for module_name, module in model.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "lora_B") and len(module.lora_A) > 0:
            adapter = next(iter(module.lora_A.keys()))
            name = hf_name(module_name) + ".weight"
            weights[name] = Target(
                name=name,
                lora_a=module.lora_A[adapter].weight,
                lora_b=module.lora_B[adapter].weight,
                scaling=float(module.scaling[adapter]),
            )
            shapes[name] = tuple(module.get_base_layer().weight.shape)
    for param_name, p in model.named_parameters():
        name = hf_name(param_name)
        if "lora_" in param_name or name in weights:
            continue
        weights[name] = Target(name=name, weight=p)
        shapes[name] = tuple(p.shape)
    return weights, shapes


def find_weights(model: torch.nn.Module, names) -> list[Target]:
    """The trainable weights (or LoRA pairs) behind `names`; ValueError naming the first one missing.

    Frozen weights without an adapter are left out: they never change, so their update is zero.
    """
    weights, _ = model_weights(model)
    targets = []
    for name in names:
        if name not in weights:
            raise ValueError(f"model has no weight {name}")
        t = weights[name]
        if t.is_lora or t.weight.requires_grad:
            targets.append(t)
    return targets


def find_targets(model: torch.nn.Module, basis: Basis) -> list[Target]:
    """Match basis entries to the model; ValueError naming the first entry missing or misshapen."""
    _, shapes = model_weights(model)
    basis.validate(shapes)
    return find_weights(model, basis.entries)
