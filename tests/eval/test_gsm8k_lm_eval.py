"""GSM8k as lm-eval-harness's `gsm8k` task: its normalisation and string comparison on its edge cases, its plain
n-shot prompt, its exemplar draw, and the numeric comparison that stays available as an option."""

import json
import random

import pytest

import safeproj.eval.gsm8k as gsm8k
from safeproj.eval.gsm8k import (
    evaluate_gsm8k,
    lm_eval_exemplars,
    lm_eval_prompt,
    load_gsm8k,
    normalize_lm_eval,
    score_output,
)

TEST_ROWS = [
    {"question": "Ann has 2 pens and buys 3. How many?", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"},
    {"question": "A bike costs $1,200 and a lock $300. Total?", "answer": "1200 + 300 = 1500\n#### 1,500"},
    {"question": "It is 5 degrees and drops 9. Temperature?", "answer": "5 - 9 = -4\n#### -4"},
]
TRAIN_ROWS = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(1, 9)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        ("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72", "72"),  # a gold answer: up to the last "#### "
        ("#### 1 then #### 2", "2"),
        ("$1,000.", "1000"),  # ",", "$" and one trailing "." go
        ("5.00", "5.00"),  # no numeric equivalence
        ("42..", "42."),
        ("ABC", "abc"),  # ignore_case
        ("5!", "5!"),  # ignore_punctuation is false
    ],
)
def test_normalisation_is_lm_evals(text, normalised):
    assert normalize_lm_eval(text) == normalised


@pytest.mark.parametrize(
    ("output", "reference", "strict", "flexible"),
    [
        ("#### 5.00", "#### 5", False, False),  # lm-eval compares strings: 5.00 is not 5
        ("The answer is 5.", "#### 5", False, True),  # flexible takes "5.", whose "." is ignored
        ("so #### 5", "2 + 3 = 5\n#### 5", True, True),
        ("#### 1,500", "#### 1,500", True, True),
        ("The total is $1500.", "#### 1,500", False, True),
        ("#### 1500.0", "#### 1500", False, False),
        ("#### -4", "#### -4", True, True),
        ("#### 4", "#### -4", False, False),
        ("#### 12 and later #### 13", "#### 12", True, False),  # strict takes the first, flexible the last
        ("The answer is 42...", "#### 42", False, False),  # "42..." keeps "42.." after one "." goes
        ("####5", "#### 5", False, True),  # strict needs the space
        ("no number at all", "#### 5", False, False),
    ],
)
def test_string_comparison_on_lm_evals_edge_cases(output, reference, strict, flexible):
    scored = score_output(output, reference, comparison="string")
    assert (scored["strict_correct"], scored["flexible_correct"]) == (strict, flexible)


def test_numeric_comparison_stays_available():
    assert score_output("#### 5.00", "5")["strict_correct"]  # the default comparison
    assert score_output("#### 5.00", "5", comparison="numeric")["strict_correct"]
    with pytest.raises(ValueError, match="numeric, string"):
        score_output("#### 5", "5", comparison="exact")


def test_prompt_is_lm_evals_plain_text():
    shots = [{"question": "What is 1 + 1?", "solution": "1 + 1 = 2\n#### 2"}]
    assert lm_eval_prompt("What is 2 + 3?", shots) == (
        "Question: What is 1 + 1?\nAnswer: 1 + 1 = 2\n#### 2\n\nQuestion: What is 2 + 3?\nAnswer:"
    )
    assert lm_eval_prompt("What is 2 + 3?") == "Question: What is 2 + 3?\nAnswer:"


def test_exemplars_are_drawn_as_lm_evals_sampler_draws_them():
    pool = [{"question": f"q{i}", "solution": f"#### {i}"} for i in range(50)]
    shots = lm_eval_exemplars(pool, n_items=4, n_shot=2)
    rnd = random.Random(1234)  # lm-eval: one generator, `rnd.sample(docs, n)` per test item, in order
    assert shots == [rnd.sample(pool, 2) for _ in range(4)]
    assert shots[0] != shots[1]
    assert lm_eval_exemplars(pool, n_items=2, n_shot=0) == [[], []]
    with pytest.raises(ValueError, match="fewer than n_shot=3"):
        lm_eval_exemplars(pool[:2], n_items=1, n_shot=3)


def test_lm_eval_protocol_end_to_end(tmp_path, monkeypatch):
    test = write_jsonl(tmp_path / "test.jsonl", TEST_ROWS)
    train = write_jsonl(tmp_path / "train.jsonl", TRAIN_ROWS)
    seen = {}

    def fake_generate(model, tokenizer, prompts, max_new_tokens, batch_size, stop=None, **kwargs):
        seen["prompts"], seen["stop"] = list(prompts), list(stop)
        return ["#### 5.00", "The total is $1,500.", "#### -4"][: len(prompts)]

    monkeypatch.setattr(gsm8k, "generate", fake_generate)
    kwargs = {"n_shot": 1, "fewshot_source": train, "progress": False}
    metrics, rows = evaluate_gsm8k(None, None, test, num_samples=None, protocol="lm-eval", **kwargs)
    assert metrics == {"strict_acc": pytest.approx(1 / 3), "flexible_acc": pytest.approx(2 / 3), "n": 3.0}
    assert [r["strict_correct"] for r in rows] == [False, False, True]
    pool = load_gsm8k(train, split="train")
    expected = [lm_eval_prompt(r["question"], ex) for r, ex in zip(TEST_ROWS, lm_eval_exemplars(pool, 3, 1))]
    assert seen["prompts"] == expected and seen["prompts"][0].startswith("Question: What is ")  # no chat template
    assert seen["stop"][:3] == ["Question:", "</s>", "<|im_end|>"]

    # The same outputs compared as numbers: "#### 5.00" counts.
    metrics, _ = evaluate_gsm8k(None, None, test, protocol="lm-eval", comparison="numeric", **kwargs)
    assert metrics["strict_acc"] == pytest.approx(2 / 3)

    # Ranks take every other item and keep the exemplars one process gives it.
    second = evaluate_gsm8k(None, None, test, protocol="lm-eval", rank=1, world_size=2, **kwargs)
    assert seen["prompts"] == expected[1::2] and len(second[1]) == 1


def test_builtin_data_keeps_numeric_comparison_by_default(monkeypatch):
    problems = load_gsm8k("builtin:useful-test", limit=4)
    golds = {p["question"]: p["gold"] for p in problems}

    def answers_with_decimals(model, tokenizer, prompts, *args, **kwargs):
        return [next(f"#### {gold}.00" for question, gold in golds.items() if question in p) for p in prompts]

    monkeypatch.setattr(gsm8k, "generate", answers_with_decimals)
    assert all(p["reference"] == p["gold"] for p in problems)  # the built-in answer field is the number
    _, rows = evaluate_gsm8k(None, _ChatTokenizer(), num_samples=4, progress=False)
    assert all(r["strict_correct"] and r["flexible_correct"] for r in rows)  # "N.00" equals N as a number
    _, rows = evaluate_gsm8k(None, _ChatTokenizer(), num_samples=4, comparison="string", progress=False)
    assert not any(r["strict_correct"] for r in rows)
    with pytest.raises(ValueError, match="chat, lm-eval"):
        evaluate_gsm8k(None, None, num_samples=1, protocol="harness", progress=False)


class _ChatTokenizer:
    """Just enough of a tokenizer for the chat prompt path."""

    chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True, **kwargs):
        return "".join(m["content"] for m in messages)
