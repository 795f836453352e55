"""The `safeproj.json` a finished run writes has exactly the keys and types docs/contracts.md promises."""

import re
from pathlib import Path

import lightning as L

from helpers.projection import loader
from safeproj.commands.fit import SafeprojCLI, recipe_name
from safeproj.model.module import SafeprojLM
from safeproj.runs import run_manifest

ROOT = Path(__file__).resolve().parents[2]
# How the contract spells each value's type.
TYPES = {"<preset or name>": str, "<dir of the starting weights>": str, "bool": bool, "<name>": str, "int": int}


def _promised() -> dict[str, type]:
    text = " ".join((ROOT / "docs" / "contracts.md").read_text().split())
    shape = re.search(r"`safeproj\.json` beside the weights: `\{(.*?)\}`", text).group(1)
    return {key: TYPES[value.strip()] for key, value in re.findall(r'"(\w+)": ([^,]+)', shape)}


def test_manifest_matches_the_contract(tmp_path):
    module = SafeprojLM(model="tiny", lr=1e-3, warmup_ratio=0.0)
    module.recipe = "useful"
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(module, loader(2, size=2))
    manifest = run_manifest(tmp_path / "checkpoint")
    promised = _promised()
    assert set(promised) == {"model", "base", "lora", "recipe", "global_step"}
    assert set(manifest) == set(promised)
    for key, kind in promised.items():
        assert isinstance(manifest[key], kind) and not (kind is int and isinstance(manifest[key], bool)), key
    assert manifest["recipe"] == "useful" and manifest["global_step"] == 2 and Path(manifest["base"]).is_dir()


def test_command_line_names_the_recipe_not_a_preset_layered_after_it():
    assert recipe_name(["recipes/mixed.yaml", "configs/trainer/gpu.yaml"]) == "mixed"
    assert recipe_name(["configs/trainer/gpu.yaml"]) is None
    cli = SafeprojCLI(run=False, args=["--config", str(ROOT / "recipes" / "useful.yaml"),
                                       "--config", str(ROOT / "configs" / "trainer" / "cpu.yaml"),
                                       "--model.model", "tiny"])  # fmt: skip
    assert cli.model.recipe == "useful"
