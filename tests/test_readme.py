"""The README and docs as executable documentation: every `safeproj`/`lightning` command they show parses.

Shell commands come from fenced bash blocks and from inline code that starts with `safeproj` or
`lightning`. `fit`/`validate` lines are parsed by the real CLI with `--print_config`; the other commands
by their own parser, without running. An inline mention of a bare command name (`safeproj overlap`)
refers to the command: it must exist.
"""

import re
import shlex
from pathlib import Path

import pytest

from safeproj.cli import main
from safeproj.commands import COMMANDS, TRAINER_COMMANDS
from safeproj.commands.dispatch import parse_command

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
PROGRAMS = ("safeproj", "lightning")
FENCED = re.compile(r"^```(?:bash|sh|shell|console)\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`((?:\S*/)?(?:safeproj|lightning) [^`]*|(?:safeproj|lightning))`")


def _invocations(text: str) -> list[str]:
    """One string per command of a shell snippet (continuations joined, `&&`/`;`/`|` split, comments cut)."""
    words = shlex.split(text.replace("\\\n", " "), comments=True)
    found, current = [], []
    for word in [*words, "&&"]:
        if word in ("&&", "||", ";", "|"):
            if current and Path(current[0]).name in PROGRAMS:
                found.append(shlex.join(current))
            current = []
        else:
            current.append(word)
    return found


def _commands() -> list[tuple[str, str]]:
    """(where, command) for every command in the documents, in order."""
    found = []
    for document in DOCUMENTS:
        text = document.read_text(encoding="utf-8")
        name = document.relative_to(ROOT)
        for block in FENCED.findall(text):
            for line in block.replace("\\\n", " ").splitlines():
                found += [(f"{name} (block)", command) for command in _invocations(line)]
        for snippet in INLINE.findall(text):
            found.append((f"{name} (inline)", snippet))
    return found


COMMAND_LINES = _commands()


def test_the_documents_show_commands():
    # The extraction itself must keep working: a broken regex would make every other test vacuous.
    commands = [command for _, command in COMMAND_LINES]
    assert len(commands) >= 20
    assert any(c.startswith(".venv/bin/lightning fit --config recipes/mixed.yaml") for c in commands)
    assert "safeproj basis --delta ... --out basis.safetensors" in commands


@pytest.mark.parametrize(("where", "command"), COMMAND_LINES, ids=[c for _, c in COMMAND_LINES])
def test_documented_command_parses(where, command, capsys):
    words = shlex.split(command)
    program, args = Path(words[0]).name, words[1:]
    if args in ([], ["…"], ["..."]):
        return  # the program itself, named in running text
    offered = (*COMMANDS, *TRAINER_COMMANDS) if program == "safeproj" else TRAINER_COMMANDS
    if len(args) == 1 and not args[0].startswith("-"):
        # A command named in running text: `safeproj overlap`, `lightning fit|validate`, `safeproj <command>`.
        names = args[0].split("|")
        if names == ["<command>"]:
            pytest.skip(f"{command}: a placeholder for any command")
        unknown = [n for n in names if n not in offered]
        assert not unknown, f"{where}: `{command}` names no {program} command"
        return
    if program == "lightning" or args[0] in TRAINER_COMMANDS:
        with pytest.raises(SystemExit) as exc:
            main([*args, "--print_config"])
        assert exc.value.code in (0, None), f"{where}: `{command}` fails: {exc.value.code}"
        assert "trainer:" in capsys.readouterr().out
        return
    parse_command(args[0], args[1:])
