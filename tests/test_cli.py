"""Every recipe and preset parses through the CLI; bad input ends with one line naming the problem."""

from pathlib import Path

import pytest

from safeproj.cli import main
from safeproj.commands import COMMANDS
from safeproj.commands.fit import SafeprojCLI

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
PRESETS = sorted((ROOT / "configs").glob("*/*.yaml"))


def _cli(*args):
    return SafeprojCLI(run=False, args=list(args))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_parses_and_instantiates(recipe, tmp_path):
    # The model is swapped for the tiny preset so every recipe instantiates in a second; the
    # projection callbacks' subspaces are not built until fit.
    cli = _cli("--config", str(recipe), "--model.model", "tiny", "--trainer.default_root_dir", str(tmp_path))
    assert cli.model.model_name == "tiny"
    assert cli.trainer.max_steps > 0
    assert Path(cli.trainer.default_root_dir) == tmp_path


class _ParseOnly(SafeprojCLI):
    """Parses and type-checks a config without building or checking files (hub presets need a network)."""

    def check_config(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_preset_layers_over_a_recipe(preset):
    cli = _ParseOnly(run=False, args=["--config", str(ROOT / "recipes/mixed.yaml"), "--config", str(preset)])
    layered = __import__("yaml").safe_load(preset.read_text())
    for group, values in layered.items():
        for key, value in values.items():
            _assert_holds(cli.config[group][key], value, f"{group}.{key}")


def _assert_holds(got, want, where: str) -> None:
    """Every value the preset sets is in the parsed config (nested init_args included; lists are replaced)."""
    if isinstance(want, dict):
        for key, value in want.items():
            _assert_holds(got[key], value, f"{where}.{key}")
    elif not isinstance(want, list):
        assert got == want or str(got) == str(want), where


def test_unknown_config_key_is_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(ROOT / "recipes/mixed.yaml"), "--model.no_such_key", "1"])
    message = str(exc.value.code)
    assert message.startswith("safeproj fit: error:") and "no_such_key" in message and "\n" not in message
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("args", [[], ["--help"], ["-h"]], ids=["bare", "--help", "-h"])
def test_overview_lists_every_command_with_its_description(args, capsys):
    main(args)
    out = capsys.readouterr().out
    listed = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ") and line.split()}
    assert set(COMMANDS) | {"fit", "validate"} <= set(listed)
    assert "test" not in listed and "predict" not in listed
    assert "Build a subspace basis from a weight delta" in listed["basis"]
    assert "optimization routine" in listed["fit"]
    assert all(len(line.split()) > 2 for name, line in listed.items() if name != "--debug")


def test_only_working_trainer_commands_are_offered():
    # SafeprojLM has no test_step or predict_step.
    assert set(SafeprojCLI.subcommands()) == {"fit", "validate"}
    with pytest.raises(SystemExit) as exc:
        main(["predict", "--config", str(ROOT / "recipes/mixed.yaml")])
    assert "predict_step" in str(exc.value.code)


@pytest.mark.parametrize(
    ("command", "flags"),
    [("basis", ["--delta", "--out"]), ("overlap", ["--a", "--b"]), ("project", ["--run", "--subspace"]),
     ("eval", ["--model"]), ("activations", ["--model"])],
)  # fmt: skip
def test_analysis_commands_take_flags(command, flags, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    usage = capsys.readouterr().out
    assert all(f"{flag} " in usage for flag in flags), usage[:600]


def test_positional_argument_where_it_reads_naturally():
    from safeproj.commands.dispatch import parse_command

    assert parse_command("sweep", ["spec.yaml"]).spec == "spec.yaml"
    assert parse_command("judge", ["eval.json", "--out", "x.json"]).eval_output == "eval.json"
    assert parse_command("basis", ["--delta", "a,b", "--out", "b.safetensors"]).out == "b.safetensors"


def test_extra_commands_are_importable():
    import importlib

    for name, target in COMMANDS.items():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), name


def test_adverts_and_the_seed_notice_are_silenced(caplog):
    from lightning.fabric.utilities.seed import seed_everything
    from lightning.pytorch.utilities import rank_zero_info

    from safeproj.commands.quiet import quiet_defaults

    quiet_defaults()
    with caplog.at_level("INFO"):
        rank_zero_info("💡 Tip: For seamless cloud logging, try installing another product")
        rank_zero_info("InstructionDataModule: 30 train + 2 val examples")
        seed_everything(0)
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["InstructionDataModule: 30 train + 2 val examples"]
