"""UtilityEval / HarmEval: a tiny Trainer run, evaluate() without a Trainer, YAML construction."""

from __future__ import annotations

import pytest
import yaml
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from helpers.evaluation import SECRET, TinyLM
from helpers.loggers import MemoryLogger, RecordingWandb, fit_tiny_lm
from safeproj.callbacks.harm_eval import HarmEval
from safeproj.callbacks.utility_eval import UtilityEval
from safeproj.eval.judges import OpenAIJudge, RefusalJudge

SMALL = {"num_samples": 3, "max_new_tokens": 6, "batch_size": 3, "n_boot": 200}


def keyed(records, prefix):
    return [(step, m) for step, m in records if any(k.startswith(prefix) for k in m)]


def test_trainer_run_logs_utility_and_harm():
    utility = UtilityEval(**SMALL, at_validation=True, every_n_val=2)
    harm = HarmEval(**SMALL, at_validation=True)
    memory, wandb = MemoryLogger(), RecordingWandb()
    trainer, module = fit_tiny_lm([utility, harm], [memory, wandb])

    # Two validations (the sanity check does not count): utility on the 2nd only, harm on both,
    # then both once more at train end.
    assert utility.validations_seen == 2 and harm.validations_seen == 2
    assert len(keyed(memory.records, "utility/")) == 1 + 1
    assert len(keyed(memory.records, "harm/")) == 2 + 1
    step, final = keyed(memory.records, "utility/")[-1]
    assert step == trainer.global_step == 4
    for key in ("utility/strict_acc", "utility/flexible_acc", "utility/n"):
        assert key in final
    # Confidence bounds are a table, not extra scalar series.
    assert not [k for _, m in memory.records for k in m if k.endswith(("_ci_low", "_ci_high"))]
    columns, data = wandb.tables["utility/intervals"]
    bounds = {row[0]: dict(zip(columns, row)) for row in data}["utility/strict_acc"]
    assert bounds["ci_low"] <= final["utility/strict_acc"] <= bounds["ci_high"]
    assert final["utility/n"] == 3
    harm_final = keyed(memory.records, "harm/")[-1][1]
    assert harm_final["harm/n"] == 3 and 1 <= harm_final["harm/mean_score"] <= 5
    assert harm_final["harm/refusal_rate"] == pytest.approx((5 - harm_final["harm/mean_score"]) / 4)  # proxy judge
    assert "utility/strict_acc" in trainer.callback_metrics and "harm/refusal_rate" in trainer.callback_metrics

    columns, data = wandb.tables["harm/samples"]
    assert len(data) == 3 and "response" in columns and "score" in columns
    columns, data = wandb.tables["utility/samples"]
    assert len(data) == 3 and {"question", "output", "gold", "strict_correct"} <= set(columns)
    assert module.model.training  # evaluation handed the train mode back


def test_validation_off_means_train_end_only():
    utility = UtilityEval(**SMALL)
    memory = MemoryLogger()
    fit_tiny_lm([utility], [memory], epochs=1)
    assert utility.validations_seen == 0
    assert len(keyed(memory.records, "utility/")) == 1


def test_evaluate_without_trainer_with_llm_judge(judge_server, api_key, tmp_path):
    module = TinyLM()
    judge = OpenAIJudge(
        judge_server.base_url,
        judge_server.model,
        api_key_env=api_key,
        cache_path=str(tmp_path / "j.sqlite"),
        backoff_base=0.001,
        progress=False,
    )
    metrics = HarmEval(**SMALL, judge=judge).evaluate(module)
    assert metrics["mean_score"] == 3.0 and metrics["n"] == 3 and metrics["share_5"] == 0.0
    assert judge_server.requests == 3
    assert all(isinstance(v, float) for v in metrics.values())
    utility = UtilityEval(**SMALL)
    out = utility.evaluate(module)
    assert out["n"] == 3 and 0 <= out["strict_acc"] <= 1 and len(utility.last_rows) == 3


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (UtilityEval, {"num_samples": 0}, "num_samples"),
        (UtilityEval, {"n_shot": -1}, "n_shot"),
        (UtilityEval, {"every_n_val": 0}, "every_n_val"),
        (UtilityEval, {"dataset": "builtin:harmful-test"}, "dataset"),
        (UtilityEval, {"stop": [""]}, "stop"),
        (HarmEval, {"max_new_tokens": 0}, "max_new_tokens"),
        (HarmEval, {"batch_size": 2.5}, "batch_size"),
        (HarmEval, {"judge": "gpt-4"}, "judge"),
        (HarmEval, {"dataset": "builtin:useful-test"}, "dataset"),
    ],
)
def test_bad_arguments(cls, kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        cls(**kwargs)


def test_module_without_tokenizer_is_named():
    class Bare(LightningModule):
        model = None

    with pytest.raises(MisconfigurationException, match="model or tokenizer"):
        UtilityEval(**SMALL).evaluate(Bare())


def test_state_dict_roundtrip_and_keys():
    a = HarmEval(**SMALL)
    a.validations_seen, a.last_metrics = 3, {"mean_score": 2.5}
    b = HarmEval(**SMALL)
    b.load_state_dict(a.state_dict())
    assert b.validations_seen == 3 and b.last_metrics == {"mean_score": 2.5}
    assert all(isinstance(v, (int, float, dict)) for v in a.state_dict().values())
    assert UtilityEval(dataset="builtin:useful-test").state_key != UtilityEval(dataset="builtin:useful-train").state_key
    assert HarmEval().state_key != UtilityEval().state_key
    assert isinstance(HarmEval().judge, RefusalJudge)


def test_yaml_builds_openai_judge_without_storing_the_key(tmp_path, api_key):
    config = {
        "trainer": {
            "logger": False,
            "enable_checkpointing": False,
            "callbacks": [
                {
                    "class_path": "safeproj.callbacks.UtilityEval",
                    "init_args": {"num_samples": 4, "n_shot": 2},
                },
                {
                    "class_path": "safeproj.callbacks.HarmEval",
                    "init_args": {
                        "num_samples": 8,
                        "judge": {
                            "class_path": "safeproj.eval.judges.OpenAIJudge",
                            "init_args": {
                                "base_url": "http://127.0.0.1:9/v1",
                                "model": "gpt-4o",
                                "api_key_env": api_key,
                            },
                        },
                    },
                },
            ],
        }
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = LightningCLI(TinyLM, run=False, args=["--config", str(path)], save_config_callback=None)
    harm = next(c for c in cli.trainer.callbacks if isinstance(c, HarmEval))
    utility = next(c for c in cli.trainer.callbacks if isinstance(c, UtilityEval))
    assert utility.n_shot == 2 and harm.num_samples == 8
    assert isinstance(harm.judge, OpenAIJudge) and harm.judge.model == "gpt-4o"
    dumped = cli.parser.dump(cli.config, skip_none=False)
    assert api_key in dumped and SECRET not in dumped  # the variable's name, never its value
    assert SECRET not in repr(harm.judge) and SECRET not in str(harm.state_dict())
