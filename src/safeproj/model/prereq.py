"""Prerequisites made on first use and cached: the safety-tuned version of a preset.

For the embedded default there is no public "base vs aligned" pair, so the aligned model is the preset
safety-tuned on the built-in refusal data, and Δ_S = safety-tuned − preset. The settings below are the
ones of recipes/safety_tune.yaml, so `lightning fit --config recipes/safety_tune.yaml` reproduces it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from filelock import FileLock
from lightning.pytorch.utilities import rank_zero_info

from safeproj.model.loading import cache_dir

SAFETY_SUFFIX = "-safety"

# Per preset: optimizer steps, learning rate, examples. The tiny model is trained from random init.
SAFETY_SETTINGS = {
    "tiny": {"max_steps": 20, "lr": 1e-3, "num_samples": 128},
    "smollm2-135m": {"max_steps": 30, "lr": 5e-5, "num_samples": 256},
}


def safety_tuned_dir(preset: str, seed: int = 0) -> Path:
    """The cached safety-tuned checkpoint of `preset`, made now if missing (progress shown)."""
    if preset not in SAFETY_SETTINGS:
        raise ValueError(
            f"no built-in safety tuning for {preset!r}; known: {', '.join(SAFETY_SETTINGS)} "
            "(for other models run recipes/safety_tune.yaml and pass its checkpoint)"
        )
    target = cache_dir() / "models" / f"{preset}{SAFETY_SUFFIX}"
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").is_file():
            _safety_tune(preset, target, seed)
    return target


def _safety_tune(preset: str, target: Path, seed: int) -> None:
    import lightning as L

    from safeproj.data.datamodule import InstructionDataModule
    from safeproj.data.sources import SourceSpec
    from safeproj.model.module import SafeprojLM

    settings = SAFETY_SETTINGS[preset]
    rank_zero_info(f"Safety-tuning {preset} on the built-in refusal data (once; cached in {target})")
    L.seed_everything(seed, verbose=False)
    module = SafeprojLM(model=preset, lr=settings["lr"], warmup_ratio=0.02, seed=seed, checkpoint_dir=str(target))
    data = InstructionDataModule(
        sources=[SourceSpec(path="builtin:refusal")],
        num_samples=settings["num_samples"],
        val_fraction=0.0,
        batch_size=4,
        max_length=256,
        seed=seed,
    )
    work = target.parent / f".{target.name}-run-{os.getpid()}"
    trainer = L.Trainer(
        accelerator="cpu" if not _has_gpu() else "auto",
        devices=1,
        max_steps=settings["max_steps"],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
        gradient_clip_val=1.0,
        default_root_dir=str(work),
    )
    try:
        trainer.fit(module, datamodule=data)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()
