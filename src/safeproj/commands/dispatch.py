"""From a `safeproj` command line to a command: each command's parser, the overview of all commands, the call."""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safeproj.commands import COMMANDS, POSITIONAL, TRAINER_COMMANDS


def command_function(name: str) -> Callable[..., Any]:
    """The function behind `safeproj <name>`."""
    module, _, function = COMMANDS[name].partition(":")
    return getattr(importlib.import_module(module), function)


def command_parser(name: str):
    """The jsonargparse parser of `safeproj <name>`: flags for every argument, except the one positional of
    the POSITIONAL commands; a parse failure raises ArgumentError instead of exiting."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    function = command_function(name)
    parser = ArgumentParser(prog=f"safeproj {name}", description=describe(name), exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of arguments")
    parser.add_function_arguments(function, as_group=False, as_positional=name in POSITIONAL, sub_configs=True)
    for action in parser._actions:
        if getattr(action, "_typehint", None) is bool and action.option_strings:
            action.nargs, action.const = "?", True  # `--plan` alone means `--plan true`
    return parser


def parse_command(name: str, args: list[str]):
    """The parsed and checked arguments of `safeproj <name> ARGS`, nothing run."""
    return command_parser(name).parse_args(args)


def run_command(name: str, args: list[str]) -> Any:
    """Parse `args` for `safeproj <name>` and call its function."""
    parser = command_parser(name)
    init = parser.instantiate(parser.parse_args(args))
    init.pop("config", None)
    return command_function(name)(**init)


def describe(name: str) -> str:
    """The first line of the command's docstring, read from its source, so the overview imports no command."""
    if name in TRAINER_COMMANDS:
        from lightning.pytorch import Trainer

        first = inspect.getdoc(getattr(Trainer, name)).splitlines()[0]
        return f"{first.rstrip('.')} (LightningCLI: --config recipes/<recipe>.yaml)"
    module, _, function = COMMANDS[name].partition(":")
    spec = importlib.util.find_spec(module)
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == function:
            return (ast.get_docstring(node) or "").strip().splitlines()[0]
    return ""


def unknown_command(name: str) -> str:
    """The one-line complaint about a command name that is not one, with the nearest real one."""
    if name in ("test", "predict"):
        return f"{name!r} is not offered: SafeprojLM has no {name}_step; `safeproj validate` scores the validation set"
    close = difflib.get_close_matches(name, [*TRAINER_COMMANDS, *COMMANDS], n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown command {name!r}: {hint}`safeproj --help` lists the commands"


def overview() -> str:
    """What bare `safeproj` and `safeproj --help` print: every command with its one-line description."""
    names = [*TRAINER_COMMANDS, *COMMANDS]
    width = max(map(len, names)) + 2
    lines = [
        "usage: safeproj <command> [arguments]     (`safeproj <command> --help` lists a command's arguments)",
        "",
        "commands:",
        *(f"  {name:<{width}}{describe(name)}" for name in names),
        "",
        "options:",
        f"  {'--debug':<{width}}show the traceback of an error (or set SAFEPROJ_DEBUG=1)",
        "",
        "`lightning fit|validate` is the same LightningCLI as `safeproj fit|validate`.",
    ]
    return "\n".join(lines)
