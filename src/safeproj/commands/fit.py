"""`safeproj fit` / `lightning fit`: LightningCLI over SafeprojLM and InstructionDataModule."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from typing_extensions import override


class LoggedSaveConfig(SaveConfigCallback):
    """Saves `config.yaml` as LightningCLI does and also stores the resolved config in W&B."""

    @override
    def save_config(self, trainer, pl_module, stage) -> None:
        from safeproj.wandb import push_config

        push_config(trainer.loggers, self.config.as_dict())


class SafeprojCLI(LightningCLI):
    """LightningCLI with the recipe name as W&B group and tag, and a CSV logger when W&B is disabled."""

    def __init__(self, *args, **kwargs) -> None:
        from safeproj.data.datamodule import InstructionDataModule
        from safeproj.model.module import SafeprojLM

        kwargs.setdefault("save_config_callback", LoggedSaveConfig)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(SafeprojLM, InstructionDataModule, *args, **kwargs)

    @override
    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        configs = [str(c) for c in (cfg.get("config") or [])]
        recipe = Path(configs[-1]).stem if configs else None
        logger = cfg.trainer.get("logger")
        if recipe and logger is not None and hasattr(logger, "init_args") and "WandbLogger" in logger.class_path:
            args = logger.init_args
            if args.get("group") is None:
                args.group = recipe
            tags = list(args.get("tags") or [])
            if recipe not in tags:
                args.tags = [*tags, recipe]

    @override
    def instantiate_classes(self) -> None:
        from safeproj.commands.prereq import ensure_presets, presets_needed

        # Made before any class is built, so the module and callbacks find them in the cache.
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        ensure_presets(presets_needed(cfg.as_dict()))
        super().instantiate_classes()

    @override
    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        from safeproj.wandb import csv_fallback, wandb_loggers, wandb_mode

        if wandb_mode() == "disabled" and wandb_loggers(trainer.loggers):
            trainer.loggers = [csv_fallback(trainer.default_root_dir)]
        return trainer
