"""The weights a subspace governs inside a model: plain parameters or LoRA pairs, by their plain HF names."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from safeproj.core.basis import Basis


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
