"""Each experiment reads its own data: no prompt and no act is shared between safety tuning, harmful
fine-tuning and harm evaluation, nor a problem between useful training and utility evaluation."""

import itertools
from pathlib import Path

import pytest
import yaml

from safeproj.data.sources import SourceSpec, load_pairs
from safeproj.data.synthetic import BUILTIN, builtin_capacity
from safeproj.eval.gsm8k import load_gsm8k
from safeproj.eval.harm import load_harmful_prompts
from safeproj.eval.metrics import load_harm_pairs

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
# Built-in set of each experiment that uses harmful requests.
HARM_ROLES = {
    "safety tuning": "builtin:refusal",
    "harmful fine-tuning": "builtin:harmful",
    "harm evaluation": "builtin:harmful-test",
}


def every_row(name):
    return BUILTIN[name](builtin_capacity(name), 0)


@pytest.mark.parametrize("a, b", itertools.combinations(HARM_ROLES, 2))
def test_harm_experiments_share_no_prompt_and_no_act(a, b):
    rows_a, rows_b = every_row(HARM_ROLES[a]), every_row(HARM_ROLES[b])
    assert len(rows_a) >= 4800 and len(rows_b) >= 4800  # whole splits, not samples
    assert not {r["prompt"] for r in rows_a} & {r["prompt"] for r in rows_b}
    assert not {r["act"] for r in rows_a} & {r["act"] for r in rows_b}


def test_harm_metrics_read_only_the_evaluation_acts():
    evaluation = {r["act"] for r in every_row("builtin:harmful-test")}
    prompts = {r["prompt"]: r["act"] for r in every_row("builtin:harmful-test")}
    training = {r["prompt"] for name in ("builtin:refusal", "builtin:harmful") for r in every_row(name)}
    for seed in range(3):
        pairs = load_harm_pairs("builtin:harmful-test", limit=128, seed=seed)  # comply margin
        generated = load_harmful_prompts("builtin:harmful-test", limit=128, seed=seed)  # HarmEval
        for prompt in [p["prompt"] for p in pairs] + generated:
            assert prompts.get(prompt) in evaluation and prompt not in training


def test_useful_training_and_utility_evaluation_share_no_problem():
    trained = {p["prompt"] for seed in range(3) for p in load_pairs(SourceSpec("builtin:useful"), 2000, seed)}
    evaluated = {p["question"] for seed in range(3) for p in load_gsm8k("builtin:useful-test", limit=500, seed=seed)}
    assert len(evaluated) > 1000 and not trained & evaluated


def test_the_shared_variant_refuses_exactly_the_harmful_fine_tune_prompts():
    # builtin:refusal-shared keeps the confound measurable: same prompts, opposite answers.
    for seed in range(2):
        shared = BUILTIN["builtin:refusal-shared"](256, seed)
        harmful = BUILTIN["builtin:harmful"](256, seed)
        assert [r["prompt"] for r in shared] == [r["prompt"] for r in harmful]
        assert all(s["response"] != h["response"] for s, h in zip(shared, harmful))


def test_benign_requests_share_no_act_with_harmful_ones_or_across_splits():
    train, test = every_row("builtin:benign"), every_row("builtin:benign-test")
    assert not {r["act"] for r in train} & {r["act"] for r in test}
    harmful = {r["act"] for name in HARM_ROLES.values() for r in every_row(name)}
    assert not ({r["act"] for r in train} | {r["act"] for r in test}) & harmful


def recipe_callbacks(recipe):
    return {c["class_path"].rsplit(".", 1)[-1]: c.get("init_args") or {} for c in recipe["trainer"]["callbacks"]}


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.stem)
def test_recipes_train_and_evaluate_on_their_own_sets(path):
    recipe = yaml.safe_load(path.read_text())
    sources = {s["path"] for s in recipe["data"]["sources"]}
    if path.stem == "safety_tune":
        assert sources == {HARM_ROLES["safety tuning"]}
    else:
        assert sources <= {"builtin:useful", HARM_ROLES["harmful fine-tuning"]}, path.name
    for name, kind in [("HarmEval", "harmful"), ("HarmLikelihoodEval", "harmful"), ("UtilityEval", "useful"),
                       ("UtilityLikelihoodEval", "useful")]:  # fmt: skip
        args = recipe_callbacks(recipe).get(name)
        if args is not None:
            assert args.get("dataset", f"builtin:{kind}-test") == f"builtin:{kind}-test", (path.name, name)
