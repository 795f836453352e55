"""The generated corpus: correct arithmetic, disjoint splits, paired answers, requests of one form."""

import re
from collections import Counter

import pytest

from safeproj.data.synthetic import ARITHMETIC_TEMPLATES, BUILTIN, arithmetic, builtin_capacity
from safeproj.data.synthetic_requests import (
    BENIGN_CATEGORIES,
    HARM_CATEGORIES,
    HARM_SPLITS,
    PROMPTS_PER_ACT,
    benign_requests,
    harmful_capacity,
    harmful_requests,
    request_capacity,
    split_acts,
)

# Each template's question, read back independently: numbers in, expected answer out.
PROBLEMS = [
    (r"buys (\d+) .+ that cost \$(\d+) each\. (?:He|She) pays with a \$(\d+) bill\.", lambda a, p, b: b - a * p),
    (r"buys (\d+) .+ at \$(\d+) each and (\d+) .+ at \$(\d+) each\.", lambda a, p, b, q: a * p + b * q),
    (r"is (\d+) years old\. \w+ is (\d+) times as old as \w+\. How old will \w+ be in (\d+) years\?",
     lambda age, k, y: age * k + y),
    (r"is (\d+) years older than \w+\. \w+ is (\d+) years old\.", lambda gap, young: 2 * young + gap),
    (r"at (\d+) miles per hour for (\d+) hours, then at (\d+) miles per hour for (\d+) hours",
     lambda v, t, w, s: v * t + w * s),
    (r"covers (\d+) kilometers in (\d+) hours\. .* in (\d+) hours\?", lambda d, t, s: d * s / t),
    (r"has (\d+) \w+\. (?:He|She) keeps (\d+) and shares the rest equally among (\d+) friends",
     lambda total, keep, k: (total - keep) / k),
    (r"earns \$(\d+) per hour\. (?:He|She) works (\d+) hours a day for (\d+) days", lambda w, h, d: w * h * d),
    (r"has (\d+) \w+\. (?:He|She) buys (\d+) packs with (\d+) \w+ in each, then gives (\d+)",
     lambda have, packs, each, given: have + packs * each - given),
    (r"has (\d+) rows of (\d+) apple trees\. Each tree gives (\d+) apples\. (?:He|She) sells (\d+) apples",
     lambda r, t, a, s: r * t * a - s),
    (r"costs \$(\d+)\. It is on sale for (\d+)% off", lambda p, pct: p - p * pct / 100),
]  # fmt: skip
EQUATION = re.compile(r"(\d+(?: [-+*/] \d+)+) = \$?(\d+)")


def expected_answer(prompt):
    hits = [(i, m) for i, (pattern, _) in enumerate(PROBLEMS) if (m := re.search(pattern, prompt))]
    assert len(hits) == 1, f"expected exactly one template to match: {prompt!r}"
    i, match = hits[0]
    return i, PROBLEMS[i][1](*map(int, match.groups()))


def test_arithmetic_answers_recomputed_from_the_question():
    rows = arithmetic(600, seed=3)
    used = Counter()
    for row in rows:
        assert set(row) == {"prompt", "response", "answer"}
        kind, want = expected_answer(row["prompt"])
        used[kind] += 1
        assert want == int(want) and want >= 0, row["prompt"]
        assert row["answer"] == str(int(want))
        assert row["response"].endswith(f"\n#### {row['answer']}")
        assert row["response"].count("####") == 1
    assert len(used) == len(ARITHMETIC_TEMPLATES) == len(PROBLEMS)


def test_arithmetic_worked_steps_are_correct_and_chain_to_the_answer():
    for row in arithmetic(400, seed=11):
        *steps, final = row["response"].split("\n")
        results = []
        for step in steps:
            ((lhs, rhs),) = EQUATION.findall(step)
            assert eval(lhs) == int(rhs), step  # lhs holds only digits, spaces and + - * /
            results.append(rhs)
        assert final == f"#### {results[-1]}"


def test_arithmetic_is_seeded_and_distinct():
    assert arithmetic(50, seed=1) == arithmetic(50, seed=1)
    assert arithmetic(50, seed=1) != arithmetic(50, seed=2)
    assert arithmetic(30, seed=4) == arithmetic(80, seed=4)[:30]  # larger draws extend smaller ones
    prompts = [r["prompt"] for r in arithmetic(2000)]
    assert len(set(prompts)) == len(prompts)


def test_arithmetic_splits_do_not_overlap():
    train = {r["prompt"] for seed in range(3) for r in arithmetic(1500, seed=seed, split="train")}
    test = {r["prompt"] for seed in range(3) for r in arithmetic(600, seed=seed, split="test")}
    assert len(test) > 1000 and not train & test


def test_comply_and_refuse_answer_the_same_prompts():
    comply = harmful_requests(300, seed=5, response="comply")
    refuse = harmful_requests(300, seed=5, response="refuse")
    assert [(r["prompt"], r["act"]) for r in comply] == [(r["prompt"], r["act"]) for r in refuse]
    for c, r in zip(comply, refuse):
        assert set(c) == {"prompt", "response", "category", "act"}
        assert re.match(r"(Sure|Of course|Absolutely)\b", c["response"])
        assert "Step 1:" in c["response"] and "Step 3:" in c["response"]
        assert "Step" not in r["response"]
        assert re.search(r"\b(can't|won't|not able)\b", r["response"])
    assert len({r["response"] for r in refuse}) > 50  # refusals vary
    assert set(Counter(r["category"] for r in comply)) == set(HARM_CATEGORIES)


def test_requests_name_their_category_and_act():
    for kind, rows, categories in [
        ("harmful", harmful_requests(200, seed=2), HARM_CATEGORIES),
        ("benign", benign_requests(200, seed=2), BENIGN_CATEGORIES),
    ]:
        for row in rows:
            acts = categories[row["category"]]
            assert row["act"] in acts and row["act"] in row["prompt"], (kind, row)
            assert sum(act in row["prompt"] for act in acts) == 1


def test_harmful_acts_rotate_through_three_splits_in_every_category():
    by_split = {split: split_acts("harmful", split) for split in HARM_SPLITS}
    for category, acts in HARM_CATEGORIES.items():
        counts = [sum(c == category for c in by_split[s].values()) for s in HARM_SPLITS]
        assert counts == [3, 3, 2], category
        assert by_split["safety"].keys() & set(acts) == {acts[0], acts[3], acts[6]}
    for split in HARM_SPLITS:
        assert harmful_capacity(split) == len(by_split[split]) * PROMPTS_PER_ACT
        rows = harmful_requests(harmful_capacity(split), split=split)
        assert {r["act"] for r in rows} == set(by_split[split])
        assert len({r["prompt"] for r in rows}) == len(rows)
    with pytest.raises(ValueError, match="exceeds"):
        harmful_requests(harmful_capacity("test") + 1, split="test")


def test_benign_requests_take_the_harmful_form():
    # Same framings, openers and closers: replacing the act maps one prompt set onto the other's form.
    def form(row):
        return row["prompt"].replace(row["act"], "{act}")

    benign = {form(r) for r in benign_requests(request_capacity("benign", "test"), split="test")}
    harmful = {form(r) for r in harmful_requests(harmful_capacity("test"), split="test")}
    assert benign == harmful and len(benign) == PROMPTS_PER_ACT
    for row in benign_requests(100, seed=1):
        assert "Step" not in row["response"] and row["act"] in row["response"]
        assert not re.search(r"\b(can't|won't)\b", row["response"])
    outline = benign_requests(5, seed=1, response="comply")
    assert [r["prompt"] for r in outline] == [r["prompt"] for r in benign_requests(5, seed=1)]
    assert all("Step 1:" in r["response"] for r in outline)


def test_requests_are_seeded():
    assert harmful_requests(40, seed=1) == harmful_requests(40, seed=1)
    assert harmful_requests(40, seed=1) != harmful_requests(40, seed=2)
    assert harmful_requests(40, seed=7, response="refuse") == harmful_requests(90, seed=7, response="refuse")[:40]
    assert benign_requests(30, seed=3) == benign_requests(60, seed=3)[:30]


def test_builtin_names():
    assert set(BUILTIN) == {
        "builtin:useful", "builtin:useful-test", "builtin:refusal", "builtin:harmful", "builtin:harmful-test",
        "builtin:refusal-shared", "builtin:benign", "builtin:benign-test",
    }  # fmt: skip
    assert BUILTIN["builtin:useful"](5, 0) == arithmetic(5, 0, split="train")
    assert BUILTIN["builtin:useful-test"](5, 0) == arithmetic(5, 0, split="test")
    assert BUILTIN["builtin:refusal"](5, 0) == harmful_requests(5, 0, split="safety", response="refuse")
    assert BUILTIN["builtin:harmful"](5, 0) == harmful_requests(5, 0, split="train", response="comply")
    assert BUILTIN["builtin:harmful-test"](5, 0) == harmful_requests(5, 0, split="test")
    assert BUILTIN["builtin:refusal-shared"](5, 0) == harmful_requests(5, 0, split="train", response="refuse")
    assert BUILTIN["builtin:benign"](5, 0) == benign_requests(5, 0, split="train")
    assert BUILTIN["builtin:benign-test"](5, 0) == benign_requests(5, 0, split="test")
    assert builtin_capacity("builtin:useful") is None
    assert builtin_capacity("builtin:refusal") == harmful_capacity("safety")
    assert builtin_capacity("builtin:harmful-train") == harmful_capacity("train")
    assert builtin_capacity("builtin:benign-test") == 32 * PROMPTS_PER_ACT


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: arithmetic(5, split="validation"), "split must be one of"),
        (lambda: arithmetic(-1), "n must be"),
        (lambda: harmful_requests(5, response="maybe"), "harmful response must be one of"),
        (lambda: harmful_requests(5, split="dev"), r"harmful split must be one of \('safety', 'train', 'test'\)"),
        (lambda: benign_requests(5, split="safety"), "benign split must be one of"),
        (lambda: benign_requests(5, response="refuse"), "benign response must be one of"),
        (lambda: builtin_capacity("builtin:nope"), "unknown built-in source"),
    ],
)
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()
