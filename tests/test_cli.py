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
    """Parses and validates a config without building anything (hub presets need a network)."""

    def instantiate_classes(self) -> None:
        pass


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_preset_layers_over_a_recipe(preset):
    cli = _ParseOnly(run=False, args=["--config", str(ROOT / "recipes/mixed.yaml"), "--config", str(preset)])
    layered = __import__("yaml").safe_load(preset.read_text())
    for group, values in layered.items():
        for key, value in values.items():
            got = cli.config[group][key]
            if isinstance(value, dict):
                assert {k: got[k] for k in value} == value
            elif not isinstance(value, list):
                assert got == value, f"{group}.{key}"


def test_unknown_config_key_is_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(ROOT / "recipes/mixed.yaml"), "--model.no_such_key", "1"])
    assert exc.value.code != 0
    err = capsys.readouterr().err
    assert "no_such_key" in err


def test_unknown_model_is_one_line():
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(ROOT / "recipes/mixed.yaml"), "--model.model", "not-a-model"])
    message = str(exc.value.code)
    assert message.startswith("safeproj: error:") and "not-a-model" in message and "\n" not in message


def test_extra_commands_are_importable():
    import importlib

    for name, target in COMMANDS.items():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), name
