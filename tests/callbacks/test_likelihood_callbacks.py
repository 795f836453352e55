"""UtilityLikelihoodEval / HarmLikelihoodEval: start value at fit start, retention at train end and per post hoc
variant, per-item tables and JSON, checkpointed state, YAML construction."""

from __future__ import annotations

import json

import pytest
import yaml
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from helpers.evaluation import TinyLM
from helpers.loggers import MemoryLogger, RecordingWandb, fit_tiny_lm
from safeproj.callbacks._likelihood_eval import LikelihoodEval
from safeproj.callbacks.harm_likelihood import HarmLikelihoodEval
from safeproj.callbacks.posthoc_projection import PosthocProjection
from safeproj.callbacks.utility_likelihood import UtilityLikelihoodEval
from safeproj.model.loading import tiny_dir

SMALL = {"num_samples": 4, "batch_size": 3, "n_boot": 100}


def test_fit_scores_the_start_once_and_reports_retention_at_train_end(tmp_path):
    utility = UtilityLikelihoodEval(**SMALL, at_validation=True, out_dir=str(tmp_path))
    harm = HarmLikelihoodEval(**SMALL, out_dir=str(tmp_path))
    memory, wandb = MemoryLogger(), RecordingWandb()
    trainer, module = fit_tiny_lm([utility, harm], [memory, wandb])

    step, start = memory.keyed("utility/answer_nll_start")[0]  # later records repeat it beside the result
    assert step == 0 and start == {"utility/answer_nll_start": utility.start_metrics["answer_nll"]}
    assert set(harm.start_metrics) == {"comply_margin", "comply_preference"}
    assert "utility/answer_nll" in trainer.callback_metrics  # validation results go through pl_module.log

    final = utility.last_metrics
    assert final["answer_nll_start"] == utility.start_metrics["answer_nll"]
    assert final["answer_nll_full"] == final["answer_nll"] != final["answer_nll_start"]  # SGD steps moved it
    assert final["answer_nll_retention"] == pytest.approx(1.0)
    assert final["answer_nll_ci_low"] <= final["answer_nll"] <= final["answer_nll_ci_high"] and final["n"] == 4
    harm_final = memory.keyed("harm/comply_margin_retention")[-1][1]
    assert harm_final["harm/comply_margin_retention"] == pytest.approx(1.0)
    assert 0 <= harm_final["harm/comply_preference"] <= 1

    columns, data = wandb.tables["utility/answer_nll_items"]
    assert len(data) == 4 and {"item", "question", "answer_nll", "n_tokens"} <= set(columns)
    # Confidence bounds are a table, not extra scalar series.
    assert not [k for _, m in memory.records for k in m if k.endswith(("_ci_low", "_ci_high"))]
    assert not [k for k in trainer.callback_metrics if k.endswith(("_ci_low", "_ci_high"))]
    columns, data = wandb.tables["utility/intervals"]
    bounds = {row[0]: dict(zip(columns, row)) for row in data}["utility/answer_nll"]
    assert bounds["ci_low"] == final["answer_nll_ci_low"] and bounds["ci_high"] == final["answer_nll_ci_high"]
    columns, data = wandb.tables["harm/comply_margin_items"]
    assert len(data) == 4 and {"prompt", "comply_logprob", "refuse_logprob", "comply_margin"} <= set(columns)

    saved = json.loads((tmp_path / "utility_items.json").read_text())["evaluations"]
    assert [e["label"] for e in saved] == ["start", "validation", "validation", "train_end"]
    assert [e["step"] for e in saved] == [0, 2, 4, 4]
    assert saved[-1]["metrics"]["answer_nll"] == pytest.approx(sum(r["answer_nll"] for r in saved[-1]["items"]) / 4)
    assert module.model.training  # evaluation handed the train mode back

    # A resumed run keeps its start value instead of re-measuring the restored weights.
    restored = UtilityLikelihoodEval(**SMALL)
    restored.load_state_dict(utility.state_dict())
    assert restored.start_metrics == utility.start_metrics and restored.validations_seen == 2
    restored.on_fit_start(trainer, module)
    assert restored.evaluations == []


def test_post_hoc_rows_get_retention_columns(tmp_path):
    # The projection callback comes first, so its variants are scored before the evaluators' own train end.
    posthoc = PosthocProjection(
        f"{tiny_dir(1)},{tiny_dir(0)}", fracs=[0.5], selections=["top"], out_dir=str(tmp_path / "posthoc")
    )
    utility = UtilityLikelihoodEval(**SMALL, at_train_end=False, out_dir=str(tmp_path))
    harm = HarmLikelihoodEval(**SMALL, at_train_end=False)
    fit_tiny_lm([posthoc, utility, harm], epochs=1)

    full, top = posthoc.rows
    assert (full["variant"], top["variant"]) == ("full", "top@0.5")
    start = utility.start_metrics["answer_nll"]
    for row in (full, top):
        assert row["utility/answer_nll_start"] == start
        assert row["utility/answer_nll_full"] == full["utility/answer_nll"]
        expected = (start - row["utility/answer_nll"]) / (start - full["utility/answer_nll"])
        assert row["utility/answer_nll_retention"] == pytest.approx(expected)
        assert "harm/comply_margin_retention" in row and "harm/comply_preference_retention" in row
    assert full["utility/answer_nll_retention"] == pytest.approx(1.0)
    assert top["utility/answer_nll"] != full["utility/answer_nll"]
    saved = json.loads((tmp_path / "utility_items.json").read_text())["evaluations"]
    assert [e["label"] for e in saved] == ["start", "full", "evaluate"]


def test_retention_columns_need_both_references():
    columns = LikelihoodEval.retention_columns
    assert columns({"answer_nll": 2.0}, {}, {"answer_nll": 1.0}) == {}
    got = columns({"answer_nll": 2.5, "n": 4.0}, {"answer_nll": 3.0}, {"answer_nll": 1.0})
    assert got == {"answer_nll_start": 3.0, "answer_nll_full": 1.0, "answer_nll_retention": 0.25}


def test_bad_arguments_raise_one_clear_error():
    with pytest.raises(MisconfigurationException, match="num_samples"):
        UtilityLikelihoodEval(num_samples=0)
    with pytest.raises(MisconfigurationException, match="max_length"):
        HarmLikelihoodEval(max_length=1)
    with pytest.raises(MisconfigurationException, match="builtin:useful-test"):
        UtilityLikelihoodEval(dataset="builtin:useful-tset")
    with pytest.raises(MisconfigurationException, match="refusal"):
        HarmLikelihoodEval(refusal=" ")


def test_yaml_builds_both_callbacks(tmp_path):
    config = {
        "trainer": {
            "logger": False,
            "enable_checkpointing": False,
            "callbacks": [
                {"class_path": "safeproj.callbacks.UtilityLikelihoodEval", "init_args": {"num_samples": 32}},
                {
                    "class_path": "safeproj.callbacks.HarmLikelihoodEval",
                    "init_args": {"dataset": "walledai/AdvBench", "refusal": "I can't help with that."},
                },
            ],
        }
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = LightningCLI(TinyLM, run=False, args=["--config", str(path)], save_config_callback=None)
    utility = next(c for c in cli.trainer.callbacks if isinstance(c, UtilityLikelihoodEval))
    harm = next(c for c in cli.trainer.callbacks if isinstance(c, HarmLikelihoodEval))
    assert utility.num_samples == 32 and utility.at_fit_start
    assert harm.dataset == "walledai/AdvBench" and harm.refusal == "I can't help with that."
