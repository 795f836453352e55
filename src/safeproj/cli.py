"""Command line: `safeproj` / `lightning` = LightningCLI over SafeprojLM and InstructionDataModule,
plus the analysis commands (`safeproj overlap|eval|activations|project|basis|sweep|report`)."""

from __future__ import annotations

import importlib
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from typing_extensions import override

# Commands beside LightningCLI's Trainer subcommands: name -> "module:function". Each function has
# typed, documented arguments that jsonargparse turns into flags.
COMMANDS = {
    "basis": "safeproj.commands:basis_command",
    "project": "safeproj.commands:project_command",
    "overlap": "safeproj.analysis.overlap:overlap_command",
    "eval": "safeproj.eval.command:eval_command",
    "activations": "safeproj.analysis.activations_command:activations_command",
    "sweep": "safeproj.analysis.sweep:sweep_command",
    "report": "safeproj.analysis.report:report_command",
}


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
    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        from safeproj.wandb import csv_fallback, wandb_loggers, wandb_mode

        if wandb_mode() == "disabled" and wandb_loggers(trainer.loggers):
            trainer.loggers = [csv_fallback(trainer.default_root_dir)]
        return trainer


def lightning_main(args: list[str] | None = None) -> None:
    """`lightning fit --config recipes/mixed.yaml` (lightning 2.6 ships no `lightning` command)."""
    _quiet_defaults()
    with _one_line_errors("safeproj"):
        SafeprojCLI(args=args)
    _finish_wandb()


def _finish_wandb() -> None:
    # Close the run here rather than at interpreter exit, so its summary and config files are
    # complete before the command returns.
    import wandb

    if wandb.run is not None:
        wandb.finish()


@contextmanager
def _one_line_errors(prog: str):
    """Bad input ends with one line naming the problem; SAFEPROJ_DEBUG=1 shows the traceback."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        yield
    except (ValueError, FileNotFoundError, MisconfigurationException) as err:
        if os.environ.get("SAFEPROJ_DEBUG"):
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        raise SystemExit(f"{prog}: error: {message}") from None


def main(args: list[str] | None = None) -> None:
    args = sys.argv[1:] if args is None else list(args)
    if args and args[0] in COMMANDS:
        from jsonargparse import CLI

        _quiet_defaults()
        module, func = COMMANDS[args[0]].split(":")
        try:
            function = getattr(importlib.import_module(module), func)
        except (ImportError, AttributeError) as err:
            raise SystemExit(f"safeproj {args[0]}: not available ({err})") from None
        with _one_line_errors(f"safeproj {args[0]}"):
            CLI(function, args=args[1:], prog=f"safeproj {args[0]}")
        return
    if args and args[0] in ("-h", "--help"):
        print("usage: safeproj {fit,validate,test,predict," + ",".join(COMMANDS) + "} ...")
        print("  fit/validate/test/predict: LightningCLI over SafeprojLM + InstructionDataModule")
        for name, target in COMMANDS.items():
            print(f"  {name:<12} {target}")
        return
    lightning_main(args)


def _quiet_defaults() -> None:
    # Tokenizers fork warnings and telemetry are noise in a training log.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("WANDB_SILENT", "true")


if __name__ == "__main__":
    main()
