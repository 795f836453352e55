"""A small generated instruction corpus, so every default and test runs without a network.

Generated here (no copied data):

- `arithmetic`: grade-school word problems with a worked answer ending in `#### N` (GSM8k style); the
  train and test splits are disjoint by a hash of each prompt, and each split draws from its own
  seeded stream;
- harmful and benign requests of one form (`safeproj.data.synthetic_requests`), split by act.

The built-in set names (`BUILTIN`) give each experiment its own data, with no prompt and no act
shared between any two of them:

    builtin:useful        useful fine-tuning       arithmetic, train split
    builtin:useful-test   utility evaluation       arithmetic, test split
    builtin:refusal       safety tuning (Δ_S)      refusals over the "safety" harmful acts
    builtin:harmful       harmful fine-tuning      compliance over the "train" harmful acts
    builtin:harmful-test  harm evaluation          compliance over the "test" harmful acts
    builtin:benign        a non-safety reference   advice over the "train" benign acts
    builtin:benign-test   activation contrast      advice over the "test" benign acts

`builtin:refusal-shared` refuses exactly the prompts `builtin:harmful` complies with (same seed, same
order): safety tuning and harmful fine-tuning then share every prompt, the confound the disjoint sets
remove, kept so that it can be measured.
"""

from __future__ import annotations

import functools
import hashlib
import random
from collections.abc import Callable

from safeproj.data.synthetic_requests import benign_requests, check_n, harmful_requests, request_capacity

# Bumped whenever a generator changes what it produces: caches of models trained on the corpus key on it.
CORPUS_VERSION = 2
SPLITS = ("train", "test")  # of arithmetic, and the evaluation names builtin:<kind>-<split>
TEST_SHARE = 5  # one arithmetic prompt in TEST_SHARE goes to the test split

_NAMES = (
    ("Ava", "she"), ("Ben", "he"), ("Chloe", "she"), ("Dev", "he"), ("Elena", "she"),
    ("Farid", "he"), ("Grace", "she"), ("Hugo", "he"), ("Ines", "she"), ("Jamal", "he"),
    ("Keiko", "she"), ("Liam", "he"), ("Maya", "she"), ("Noah", "he"), ("Olga", "she"),
    ("Pablo", "he"), ("Quinn", "she"), ("Ravi", "he"), ("Sofia", "she"), ("Tomas", "he"),
    ("Uma", "she"), ("Victor", "he"), ("Wen", "she"), ("Yusuf", "he"), ("Zara", "she"),
)  # fmt: skip
_ITEMS = (
    "apples", "notebooks", "pens", "toy cars", "books", "tickets", "muffins", "candles",
    "pencils", "balloons", "cupcakes", "marbles", "comic books", "plants", "puzzles",
)  # fmt: skip
_COLLECTIBLES = ("stickers", "marbles", "cards", "stamps", "shells", "coins", "beads")
_VEHICLES = ("car", "train", "bus", "boat", "truck", "cyclist")


def _split_of(prompt: str) -> str:
    """Deterministic split of a prompt: the hash decides, so train and test can never share one."""
    digest = hashlib.blake2b(prompt.encode("utf-8"), digest_size=8).digest()
    return "test" if int.from_bytes(digest, "big") % TEST_SHARE == 0 else "train"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _person(rng: random.Random, avoid: str | None = None) -> tuple[str, str, str]:
    """(name, subject pronoun, capitalised subject pronoun)."""
    name, pron = rng.choice([p for p in _NAMES if p[0] != avoid])
    return name, pron, pron.capitalize()


# --- arithmetic templates: each returns (prompt, worked lines, answer) -------------------------
# Every worked line holds one equation "a op b [op c] = r" so the arithmetic can be checked.


def _shopping_change(rng: random.Random):
    name, he, He = _person(rng)
    item = rng.choice(_ITEMS)
    count, price = rng.randint(2, 9), rng.randint(2, 15)
    cost = count * price
    bill = rng.choice([b for b in (20, 50, 100, 200) if b > cost])
    prompt = (
        f"{name} buys {count} {item} that cost ${price} each. {He} pays with a ${bill} bill. "
        f"How much change does {he} get back?"
    )
    lines = [f"The {item} cost {count} * {price} = ${cost}.", f"{He} gets back {bill} - {cost} = ${bill - cost}."]
    return prompt, lines, bill - cost


def _shopping_total(rng: random.Random):
    name, he, _ = _person(rng)
    first, second = rng.sample(_ITEMS, 2)
    a, p1, b, p2 = rng.randint(2, 9), rng.randint(2, 12), rng.randint(2, 9), rng.randint(2, 12)
    prompt = f"{name} buys {a} {first} at ${p1} each and {b} {second} at ${p2} each. How much does {he} spend in total?"
    lines = [
        f"The {first} cost {a} * {p1} = ${a * p1}.",
        f"The {second} cost {b} * {p2} = ${b * p2}.",
        f"In total {he} spends {a * p1} + {b * p2} = ${a * p1 + b * p2}.",
    ]
    return prompt, lines, a * p1 + b * p2


def _ages_times(rng: random.Random):
    name, _, _ = _person(rng)
    other, _, _ = _person(rng, avoid=name)
    age, times, years = rng.randint(3, 15), rng.randint(2, 4), rng.randint(2, 10)
    prompt = (
        f"{name} is {age} years old. {other} is {times} times as old as {name}. "
        f"How old will {other} be in {years} years?"
    )
    now = age * times
    lines = [
        f"{other} is {age} * {times} = {now} years old now.",
        f"In {years} years {other} will be {now} + {years} = {now + years}.",
    ]
    return prompt, lines, now + years


def _ages_sum(rng: random.Random):
    name, _, _ = _person(rng)
    other, _, _ = _person(rng, avoid=name)
    young, gap = rng.randint(4, 40), rng.randint(2, 30)
    prompt = f"{name} is {gap} years older than {other}. {other} is {young} years old. What is the sum of their ages?"
    old = young + gap
    lines = [
        f"{name} is {young} + {gap} = {old} years old.",
        f"Together they are {old} + {young} = {old + young} years old.",
    ]
    return prompt, lines, old + young


def _speed_two_legs(rng: random.Random):
    vehicle = rng.choice(_VEHICLES)
    v1, t1, v2, t2 = rng.randint(5, 80), rng.randint(2, 6), rng.randint(5, 80), rng.randint(2, 6)
    prompt = (
        f"A {vehicle} travels at {v1} miles per hour for {t1} hours, then at {v2} miles per hour "
        f"for {t2} hours. How many miles does it travel in total?"
    )
    lines = [
        f"First it travels {v1} * {t1} = {v1 * t1} miles.",
        f"Then it travels {v2} * {t2} = {v2 * t2} miles.",
        f"In total it travels {v1 * t1} + {v2 * t2} = {v1 * t1 + v2 * t2} miles.",
    ]
    return prompt, lines, v1 * t1 + v2 * t2


def _speed_same_rate(rng: random.Random):
    vehicle = rng.choice(_VEHICLES)
    speed, t1, t2 = rng.randint(5, 90), rng.randint(2, 8), rng.randint(2, 12)
    distance = speed * t1
    prompt = (
        f"A {vehicle} covers {distance} kilometers in {t1} hours. At the same speed, "
        f"how many kilometers does it cover in {t2} hours?"
    )
    lines = [
        f"Its speed is {distance} / {t1} = {speed} kilometers per hour.",
        f"In {t2} hours it covers {speed} * {t2} = {speed * t2} kilometers.",
    ]
    return prompt, lines, speed * t2


def _sharing(rng: random.Random):
    name, _, He = _person(rng)
    thing = rng.choice(_COLLECTIBLES)
    friends, each, keep = rng.randint(2, 9), rng.randint(2, 15), rng.randint(1, 20)
    total = friends * each + keep
    prompt = (
        f"{name} has {total} {thing}. {He} keeps {keep} and shares the rest equally among "
        f"{friends} friends. How many {thing} does each friend get?"
    )
    rest = total - keep
    lines = [
        f"{He} shares {total} - {keep} = {rest} {thing}.",
        f"Each friend gets {rest} / {friends} = {each} {thing}.",
    ]
    return prompt, lines, each


def _earnings(rng: random.Random):
    name, he, He = _person(rng)
    wage, hours, days = rng.randint(8, 30), rng.randint(2, 9), rng.randint(2, 7)
    prompt = (
        f"{name} earns ${wage} per hour. {He} works {hours} hours a day for {days} days. "
        f"How much does {he} earn in total?"
    )
    daily = wage * hours
    lines = [
        f"Each day {he} earns {wage} * {hours} = ${daily}.",
        f"Over {days} days {he} earns {daily} * {days} = ${daily * days}.",
    ]
    return prompt, lines, daily * days


def _packs_then_give(rng: random.Random):
    name, he, He = _person(rng)
    other, _, _ = _person(rng, avoid=name)
    thing = rng.choice(_COLLECTIBLES)
    have, packs, per_pack = rng.randint(3, 40), rng.randint(2, 8), rng.randint(3, 12)
    bought = packs * per_pack
    given = rng.randint(1, have + bought - 1)
    prompt = (
        f"{name} has {have} {thing}. {He} buys {packs} packs with {per_pack} {thing} in each, "
        f"then gives {given} {thing} to {other}. How many {thing} does {name} have now?"
    )
    lines = [
        f"{He} buys {packs} * {per_pack} = {bought} {thing}.",
        f"Then {he} has {have} + {bought} = {have + bought} {thing}.",
        f"After giving some away {he} has {have + bought} - {given} = {have + bought - given} {thing}.",
    ]
    return prompt, lines, have + bought - given


def _orchard(rng: random.Random):
    name, _, He = _person(rng)
    rows, trees, apples = rng.randint(2, 9), rng.randint(3, 12), rng.randint(5, 30)
    total = rows * trees * apples
    sold = rng.randint(1, total - 1)
    prompt = (
        f"{name} has {rows} rows of {trees} apple trees. Each tree gives {apples} apples. "
        f"{He} sells {sold} apples. How many apples are left?"
    )
    lines = [
        f"There are {rows} * {trees} = {rows * trees} trees.",
        f"They give {rows * trees} * {apples} = {total} apples.",
        f"After selling, {total} - {sold} = {total - sold} apples are left.",
    ]
    return prompt, lines, total - sold


def _discount(rng: random.Random):
    item = rng.choice(("jacket", "bike", "lamp", "backpack", "chair", "guitar", "watch"))
    pct = rng.choice((10, 20, 25, 50))
    price = 20 * rng.randint(1, 25)
    off = price * pct // 100
    prompt = f"A {item} costs ${price}. It is on sale for {pct}% off. How much does the {item} cost on sale?"
    lines = [f"The discount is {price} * {pct} / 100 = ${off}.", f"The sale price is {price} - {off} = ${price - off}."]
    return prompt, lines, price - off


ARITHMETIC_TEMPLATES: tuple[Callable, ...] = (
    _shopping_change, _shopping_total, _ages_times, _ages_sum, _speed_two_legs, _speed_same_rate,
    _sharing, _earnings, _packs_then_give, _orchard, _discount,
)  # fmt: skip


def arithmetic(n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """`n` distinct word problems: dicts with `prompt`, `response` (worked, ends `#### N`), `answer`.

    Deterministic for (`seed`, `split`); the two splits never share a prompt.
    """
    check_n(n)
    _check_split(split)
    rng = random.Random(f"safeproj.arithmetic:{split}:{seed}")
    out: list[dict] = []
    seen: set[str] = set()
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 100 * n + 10_000:  # the space is huge; this only guards against a bad template
            raise RuntimeError(f"could not generate {n} distinct arithmetic problems")
        prompt, lines, answer = rng.choice(ARITHMETIC_TEMPLATES)(rng)
        if prompt in seen or _split_of(prompt) != split:
            continue
        seen.add(prompt)
        response = "\n".join(lines) + f"\n#### {answer}"
        out.append({"prompt": prompt, "response": response, "answer": str(answer)})
    return out


BUILTIN_PREFIX = "builtin:"
# Built-in source names (see `safeproj.data.records`): name -> generator(n, seed). The module docstring
# says which experiment each one feeds.
BUILTIN: dict[str, Callable[[int, int], list[dict]]] = {
    "builtin:useful": functools.partial(arithmetic, split="train"),
    "builtin:useful-test": functools.partial(arithmetic, split="test"),
    "builtin:refusal": functools.partial(harmful_requests, split="safety", response="refuse"),
    "builtin:harmful": functools.partial(harmful_requests, split="train", response="comply"),
    "builtin:harmful-test": functools.partial(harmful_requests, split="test", response="comply"),
    "builtin:refusal-shared": functools.partial(harmful_requests, split="train", response="refuse"),
    "builtin:benign": functools.partial(benign_requests, split="train", response="advise"),
    "builtin:benign-test": functools.partial(benign_requests, split="test", response="advise"),
}
# Evaluation names both splits of a set ("builtin:useful-train" beside "builtin:useful-test");
# training sources call the train split by the bare name.
SPLIT_ALIASES = {
    "builtin:useful-train": "builtin:useful",
    "builtin:harmful-train": "builtin:harmful",
    "builtin:benign-train": "builtin:benign",
}
_REQUEST_KINDS = {harmful_requests: "harmful", benign_requests: "benign"}


def builtin_name(name: str, what: str = "source") -> str:
    """The BUILTIN key for a built-in set name or its split alias; ValueError naming the known sets."""
    canonical = SPLIT_ALIASES.get(name, name)
    if canonical not in BUILTIN:
        known = ", ".join(sorted({*BUILTIN, *SPLIT_ALIASES}))
        raise ValueError(f"unknown built-in {what} {name!r}; known: {known}")
    return canonical


def builtin_split(name: str, kind: str) -> str:
    """The split of an evaluation set "builtin:<kind>-<split>" (kind: useful, harmful or benign), checked."""
    allowed = [f"{BUILTIN_PREFIX}{kind}-{split}" for split in SPLITS]
    if name not in allowed:
        raise ValueError(f"unknown built-in set {name!r}; expected one of {', '.join(allowed)}")
    return name.rsplit("-", 1)[1]


def builtin_capacity(name: str) -> int | None:
    """How many distinct rows a built-in set can generate (None: no practical limit)."""
    generate = BUILTIN[builtin_name(name)]
    kind = _REQUEST_KINDS.get(generate.func)
    return None if kind is None else request_capacity(kind, generate.keywords["split"])
