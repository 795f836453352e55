"""Command line: `safeproj` / `lightning` = LightningCLI over SafeprojLM and InstructionDataModule (fit,
validate), plus the analysis commands (`safeproj basis|project|overlap|eval|judge|activations|sweep|report|prereq`).

Bad input ends with one line on stderr and a non-zero exit; `--debug` or SAFEPROJ_DEBUG=1 shows the traceback.
"""

from __future__ import annotations

import sys

from safeproj.commands import COMMANDS, TRAINER_COMMANDS


def main(args: list[str] | None = None) -> None:
    """`safeproj <command> ...`; bare `safeproj` and `safeproj --help` list the commands."""
    from safeproj.commands.errors import split_debug
    from safeproj.commands.lifetime import follow_parent_if_asked

    follow_parent_if_asked()
    args, debug = split_debug(sys.argv[1:] if args is None else list(args))
    if not args or args[0] in ("-h", "--help"):
        from safeproj.commands.dispatch import overview

        print(overview())
        return
    if args[0] not in COMMANDS:
        if not args[0].startswith("-") and args[0] not in TRAINER_COMMANDS:
            from safeproj.commands.dispatch import unknown_command

            raise SystemExit(f"safeproj: error: {unknown_command(args[0])}")
        lightning_main(args, debug=debug)
        return
    from safeproj.commands.dispatch import run_command
    from safeproj.commands.errors import one_line_errors
    from safeproj.commands.quiet import quiet_defaults

    quiet_defaults()
    with one_line_errors(f"safeproj {args[0]}", debug):
        run_command(args[0], args[1:])


def lightning_main(args: list[str] | None = None, debug: bool = False) -> None:
    """`lightning fit --config recipes/mixed.yaml` (lightning 2.6 ships no `lightning` command)."""
    from safeproj.commands.errors import one_line_errors, split_debug
    from safeproj.commands.quiet import quiet_defaults

    args, flagged = split_debug(sys.argv[1:] if args is None else list(args))
    quiet_defaults()
    prog = f"safeproj {args[0]}" if args and args[0] in TRAINER_COMMANDS else "safeproj"
    with one_line_errors(prog, debug or flagged):
        from safeproj.commands.fit import SafeprojCLI

        SafeprojCLI(args=args)
    _finish_wandb()


def _finish_wandb() -> None:
    # Close the run here rather than at interpreter exit, so its summary and config files are
    # complete before the command returns.
    import wandb

    if wandb.run is not None:
        wandb.finish()


if __name__ == "__main__":
    main()
