"""recipes/sweeps/paper.yaml: the paper's runs, post hoc grids, data, training and evaluation settings, every cell
parsed and checked by the CLI as its runs will be, offline, against tiny stand-ins cached under the paper's
hub names (nothing is downloaded or trained)."""

from pathlib import Path

import pytest
import yaml

from helpers.hub import cache_model, offline_hub_cache
from safeproj.commands.fit import SafeprojCLI
from safeproj.commands.sweep.config import check_cell, run_config
from safeproj.commands.sweep.spec import load_spec
from safeproj.model.loading import tiny_model
from safeproj.model.subspaces import ALIGNMENT_PAIRS

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "recipes" / "sweeps" / "paper.yaml"
FRACS = [0.01, 0.25, 0.5, 0.75, 0.99]
SELECTIONS = ["top", "random-k", "random"]
POSTHOC = [f"{run}-subspace={ref}" for run in ("useful", "harmful", "mixed") for ref in ("alignment", "safety")]
ONLINE = [f"extension-online-frac={f}-selection={s}" for f in (0.25, 0.75) for s in ("top", "random")]


@pytest.fixture(scope="module")
def paper_hub(tmp_path_factory):
    """Tiny stand-ins saved as Qwen2.5-1.5B-Instruct and Qwen2.5-1.5B in an offline hub cache."""
    instruct, base = ALIGNMENT_PAIRS["qwen2.5-1.5b"]
    with offline_hub_cache(tmp_path_factory.mktemp("paper-hub")) as cache:
        for repo, seed in ((instruct, 1), (base, 0)):
            model, tok = tiny_model(seed=seed)
            cache_model(cache, repo, model, tok)
        yield cache


class _ParseOnly(SafeprojCLI):
    def _set_seed(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass


def _parsed(cell, tmp_path):
    overrides = tmp_path / f"{cell.recipe.stem}.yaml"
    overrides.write_text(yaml.safe_dump(run_config(cell, 0, tmp_path / "run", "paper")))
    paths = [cell.recipe, *cell.configs, overrides]
    return _ParseOnly(run=False, args=[arg for path in paths for arg in ("--config", str(path))]).config


def _callback(config, name):
    return next(cb.init_args for cb in config.trainer.callbacks if cb.class_path.endswith(f".{name}"))


def test_the_spec_lists_the_papers_runs():
    sweep = load_spec(SPEC)
    assert [c.name for c in sweep.cells] == POSTHOC + ONLINE
    assert len(sweep.seeds) >= 1


@pytest.mark.parametrize("name", [n for n in POSTHOC if n.endswith("alignment")] + ONLINE)
def test_every_cell_parses_with_the_papers_settings(name, paper_hub, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "unused")  # the judge's key must exist before a run; it is never sent
    sweep = load_spec(SPEC)
    cell = next(c for c in sweep.cells if c.name == name)
    check_cell(cell, sweep, tmp_path)  # every spec and argument checked, nothing built
    config = _parsed(cell, tmp_path)
    assert config.model.model == "Qwen/Qwen2.5-1.5B-Instruct"
    assert (config.model.lr, config.model.warmup_ratio) == (1e-5, 0.02)
    trainer = config.trainer
    assert (trainer.precision, trainer.max_epochs, trainer.max_steps, trainer.limit_val_batches) == (
        "bf16-true",
        1,
        -1,
        0,
    )
    assert config.data.batch_size * trainer.accumulate_grad_batches == 32
    assert (config.data.max_length, config.data.val_fraction) == (512, 0.0)

    utility, harm = _callback(config, "UtilityEval"), _callback(config, "HarmEval")
    assert (utility.dataset, utility.num_samples, utility.n_shot, utility.protocol) == (
        "openai/gsm8k",
        1319,
        1,
        "lm-eval",
    )
    assert (harm.num_samples, harm.max_new_tokens, harm.chat_template) == (520, 512, False)
    assert harm.judge.class_path.endswith("OpenAIJudge") and harm.judge.init_args.template == "paper"

    sources = {s.path: s for s in config.data.sources}
    run = name.split("-subspace=")[0]
    if run == "useful":
        assert config.data.num_samples == 20000 and sources["metamathqa"].limit == 20000
    elif run == "harmful":
        assert config.data.num_samples == 4000 and sources["beavertails-unsafe"].split == "30k_train"
    else:
        assert config.data.num_samples == 20000
        assert (sources["metamathqa"].weight, sources["beavertails-unsafe"].weight) == (0.8, 0.2)
    classes = [cb.class_path.rsplit(".", 1)[-1] for cb in trainer.callbacks]
    if name in ONLINE:
        online = _callback(config, "OnlineProjection")
        assert (online.subspace, online.keep) == ("alignment", "orthogonal") and "PosthocProjection" not in classes
        return
    posthoc = _callback(config, "PosthocProjection")
    assert "OnlineProjection" not in classes and not utility.at_train_end and not harm.at_train_end
    assert (posthoc.subspace, posthoc.fracs, posthoc.selections) == ("alignment", FRACS, SELECTIONS)
    assert posthoc.keep == ("orthogonal" if run == "mixed" else "parallel")


@pytest.mark.parametrize("name", [n for n in POSTHOC if n.endswith("safety")])
def test_safety_cells_parse(name, paper_hub, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "unused")
    sweep = load_spec(SPEC)
    check_cell(next(c for c in sweep.cells if c.name == name), sweep, tmp_path)
