"""Command line: `safeproj` / `lightning` = LightningCLI over SafeprojLM and InstructionDataModule,
plus the analysis commands (`safeproj overlap|eval|activations|project|basis|sweep|report`)."""

from __future__ import annotations

import importlib
import os
import sys
from contextlib import contextmanager

from safeproj.commands import COMMANDS


def lightning_main(args: list[str] | None = None) -> None:
    """`lightning fit --config recipes/mixed.yaml` (lightning 2.6 ships no `lightning` command)."""
    _quiet_defaults()
    with _one_line_errors("safeproj"):
        from safeproj.commands.fit import SafeprojCLI

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
