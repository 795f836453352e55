"""GSM8k extraction (lm-eval-harness semantics), data loading, n-shot prompts and scoring."""

from __future__ import annotations

import json

import pytest

import safeproj.eval.gsm8k as gsm8k
from safeproj.data.templates import format_prompt
from safeproj.eval.gsm8k import (
    build_prompts,
    evaluate_gsm8k,
    extract_flexible,
    extract_strict,
    fewshot_exemplars,
    gold_answer,
    load_gsm8k,
    numbers_equal,
)

GSM8K_ROWS = [
    {"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
    {"question": "A shirt costs $1,200 and a hat $300. Total?", "answer": "1200 + 300 = 1500\n#### 1,500"},
    {"question": "It is 5 degrees and drops 9. Temperature?", "answer": "5 - 9 = -4\n#### -4"},
]


@pytest.mark.parametrize(
    ("text", "strict", "flexible"),
    [
        ("3 + 4 = 7\n#### 7", "7", "7"),
        ("#### -5", "-5", "-5"),
        ("#### 1,000", "1,000", "1,000"),
        ("#### 3.50", "3.50", "3.50"),
        ("#### 12 and later #### 13", "12", "13"),  # strict takes the first, flexible the last
        ("The answer is 42.", None, "42."),
        ("She pays $18.", None, "$18."),
        ("I have 3 apples and 5 pears", None, "5"),
        ("x = 3.0 so the total is 1,250 dollars", None, "1,250"),
        ("no digits at all", None, None),
        ("####7", None, "7"),  # strict needs the space, as lm-eval's regex does
        ("Answer: -7\n\n", None, "-7"),
        ("The answer is 42...", None, "42..."),  # dots belong to the span; "42.." then fails to match
    ],
)
def test_extraction_matches_lm_eval(text, strict, flexible):
    assert extract_strict(text) == strict
    assert extract_flexible(text) == flexible


@pytest.mark.parametrize(
    ("predicted", "gold", "equal"),
    [
        ("1,000", "1000", True),
        ("3.0", "3", True),
        ("$18.", "18", True),
        ("-5", "-5", True),
        ("-5", "5", False),
        ("0.50", ".5", True),
        ("42", "43", False),
        ("...", "3", False),
        (None, "3", False),
    ],
)
def test_numbers_equal(predicted, gold, equal):
    assert numbers_equal(predicted, gold) is equal


def test_gold_answer():
    assert [gold_answer(r["answer"]) for r in GSM8K_ROWS] == ["7", "1500", "-4"]
    assert gold_answer("42") == "42"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_load_local_jsonl_and_builtin(tmp_path):
    path = write_jsonl(tmp_path / "test.jsonl", GSM8K_ROWS)
    problems = load_gsm8k(path, limit=2)
    assert [p["gold"] for p in problems] == ["7", "1500"]
    assert problems[0]["solution"].endswith("#### 7")
    built = load_gsm8k("builtin:useful-test", limit=5, seed=1)
    assert len(built) == 5 and all(p["solution"].endswith(f"#### {p['gold']}") for p in built)
    assert built == load_gsm8k("builtin:useful-test", limit=5, seed=1)
    assert built != load_gsm8k("builtin:useful-test", limit=5, seed=2)


def test_load_errors(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x"}])
    with pytest.raises(ValueError, match="'question' and 'answer'"):
        load_gsm8k(bad)
    with pytest.raises(ValueError, match="builtin:useful-test"):
        load_gsm8k("builtin:useful-dev", limit=3)
    with pytest.raises(ValueError, match="not a built-in set"):
        load_gsm8k("./missing.jsonl")
    with pytest.raises(ValueError, match="fewshot_source"):
        fewshot_exemplars(write_jsonl(tmp_path / "t.jsonl", GSM8K_ROWS), n_shot=2)


def test_zero_shot_prompt_is_the_shared_template(tiny):
    _, tok = tiny
    assert build_prompts(tok, ["What is 2 + 2?"]) == [format_prompt(tok, "What is 2 + 2?")]


def test_few_shot_exemplars_are_prior_turns(tiny, tmp_path):
    _, tok = tiny
    train = write_jsonl(tmp_path / "train.jsonl", GSM8K_ROWS)
    shots = fewshot_exemplars("local.jsonl", 2, seed=0, fewshot_source=train)
    assert len(shots) == 2
    prompt = build_prompts(tok, ["Final question?"], shots)[0]
    positions = [prompt.index(s["question"]) for s in shots] + [prompt.index("Final question?")]
    assert positions == sorted(positions)
    for shot in shots:
        assert shot["solution"] in prompt
    assert prompt.endswith(format_prompt(tok, "Final question?").split("Final question?")[-1])
    builtin_shots = fewshot_exemplars("builtin:useful-test", 3)
    test_questions = {p["question"] for p in load_gsm8k("builtin:useful-test", limit=50)}
    assert len(builtin_shots) == 3 and not test_questions & {s["question"] for s in builtin_shots}


def test_scoring_pipeline_with_known_outputs(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    path = write_jsonl(tmp_path / "test.jsonl", GSM8K_ROWS)
    answers = ["so #### 7", "The total is $1,500.", "#### 4"]  # strict+flex, flex only, wrong sign

    def fake_generate(model, tokenizer, prompts, *args, **kwargs):
        assert all("### Response:" in p for p in prompts)
        return answers[: len(prompts)]

    monkeypatch.setattr(gsm8k, "generate", fake_generate)
    metrics, rows = evaluate_gsm8k(model, tok, path, num_samples=3, progress=False)
    assert metrics == {"strict_acc": pytest.approx(1 / 3), "flexible_acc": pytest.approx(2 / 3), "n": 3.0}
    assert [r["strict_correct"] for r in rows] == [True, False, False]
    assert [r["flexible_correct"] for r in rows] == [True, True, False]
    assert rows[1]["flexible"] == "$1,500." and rows[2]["gold"] == "-4"


def test_tiny_model_run_and_sharding(tiny):
    model, tok = tiny
    metrics, rows = evaluate_gsm8k(model, tok, num_samples=5, max_new_tokens=6, progress=False)
    assert metrics["n"] == 5 and len(rows) == 5
    assert set(rows[0]) == {"question", "output", "gold", "strict", "flexible", "strict_correct", "flexible_correct"}
    halves = [
        evaluate_gsm8k(model, tok, num_samples=5, max_new_tokens=6, rank=r, world_size=2, progress=False)[1]
        for r in (0, 1)
    ]
    assert [r["question"] for r in halves[0]] == [r["question"] for r in rows[0::2]]
    assert [r["output"] for r in halves[1]] == [r["output"] for r in rows[1::2]]


def test_rows_without_an_answer_are_dropped_and_reported(tmp_path):
    rows = [GSM8K_ROWS[0], {"question": "No answer yet?", "answer": ""}, GSM8K_ROWS[2]]
    path = write_jsonl(tmp_path / "gaps.jsonl", rows)
    with pytest.warns(
        UserWarning, match=r"gaps\.jsonl: dropped 1 of 3 rows with an empty question or answer \(line 2\)"
    ):
        problems = load_gsm8k(path)
    assert [p["gold"] for p in problems] == ["7", "-4"]
    with pytest.raises(ValueError, match=r"no field\(s\) \['answer'\]; .* the columns are question, solution"):
        load_gsm8k(write_jsonl(tmp_path / "renamed.jsonl", [{"question": "q", "solution": "s"}]))


def test_builtin_train_and_test_sets_come_from_the_generator():
    from safeproj.data.synthetic import arithmetic

    train = load_gsm8k("builtin:useful-train", limit=3, seed=4)
    rows = arithmetic(3, seed=4, split="train")
    assert [p["question"] for p in train] == [r["prompt"] for r in rows]
    assert [p["solution"] for p in train] == [r["response"] for r in rows]
    assert [p["gold"] for p in train] == [gold_answer(r["answer"]) for r in rows]
