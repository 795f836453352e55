"""Answer NLL and comply margin: metric states that add up across ranks, the margin's sign, paired harm data."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from safeproj.data.synthetic import arithmetic
from safeproj.eval.likelihood import continuation_logprobs
from safeproj.eval.metrics import (
    AnswerNLL,
    ComplyMargin,
    evaluate_answer_nll,
    evaluate_comply_margin,
    load_harm_pairs,
)


class PrefersOneToken(torch.nn.Module):
    """A causal LM stub whose every position gives `token` log-odds `strength` over a uniform rest."""

    def __init__(self, vocab_size: int, token: int, strength: float = 4.0):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(vocab_size))
        with torch.no_grad():
            self.bias[token] = strength

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return SimpleNamespace(logits=self.bias.expand(*input_ids.shape, -1))


def test_answer_nll_metric_merges_like_ranks():
    sums = torch.tensor([-10.0, -3.0, -8.0, -1.0, -6.0], dtype=torch.float64)
    counts = torch.tensor([5, 3, 2, 1, 4])
    whole = AnswerNLL()
    whole.update(sums, counts)
    rank0, rank1 = AnswerNLL(), AnswerNLL()
    rank0.update(sums[0::2], counts[0::2])
    rank1.update(sums[1::2], counts[1::2])
    rank0.merge_state(rank1)  # what the summed states do under DDP sync
    expected = (2.0 + 1.0 + 4.0 + 1.0 + 1.5) / 5  # mean over items of each item's per-token NLL
    for metric in (whole, rank0):
        got = metric.compute()
        assert got["answer_nll"].item() == pytest.approx(expected)
        assert got["n"].item() == 5 and got["n_tokens"].item() == 15


def test_comply_margin_metric_merges_like_ranks():
    comply = torch.tensor([-1.0, -2.0, -0.5, -3.0])
    refuse = torch.tensor([-2.0, -1.0, -0.5, -1.0])
    rank0, rank1 = ComplyMargin(), ComplyMargin()
    rank0.update(comply[:1], refuse[:1])
    rank1.update(comply[1:], refuse[1:])
    rank0.merge_state(rank1)
    got = rank0.compute()
    assert got["comply_margin"].item() == pytest.approx((1.0 - 1.0 + 0.0 - 2.0) / 4)
    assert got["comply_preference"].item() == pytest.approx(1 / 4)  # a zero margin is no preference
    assert got["n"].item() == 4


def pairs_file(tmp_path, n=3):
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"request {i}?", "comply": "aaaa aaaa", "refuse": "bbbb"} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


@pytest.mark.parametrize(("preferred", "sign"), [("a", 1), ("b", -1)])
def test_margin_sign_follows_the_preferred_continuation(tiny, tmp_path, preferred, sign):
    _, tokenizer = tiny
    model = PrefersOneToken(len(tokenizer), tokenizer.convert_tokens_to_ids(preferred))
    metrics, rows = evaluate_comply_margin(
        model,
        tokenizer,
        dataset=pairs_file(tmp_path),
        num_samples=3,
        comply_field="comply",
        refuse_field="refuse",
        progress=False,
    )
    assert all(sign * r["comply_margin"] > 0 for r in rows)
    assert sign * metrics["comply_margin"] > 0
    assert metrics["comply_preference"] == (1.0 if sign > 0 else 0.0)
    assert metrics["comply_margin"] == pytest.approx(sum(r["comply_margin"] for r in rows) / 3)


def test_answer_nll_is_the_item_mean_and_ranks_split_the_items(tiny):
    model, tokenizer = tiny
    metrics, rows = evaluate_answer_nll(model, tokenizer, num_samples=5, batch_size=2, progress=False)
    problems = arithmetic(5, seed=0, split="test")
    sums, counts = continuation_logprobs(model, tokenizer, [(p["prompt"], p["response"]) for p in problems])
    per_item = (-sums / counts).tolist()
    assert [r["answer_nll"] for r in rows] == pytest.approx(per_item)
    assert metrics["answer_nll"] == pytest.approx(sum(per_item) / 5)
    assert metrics["n"] == 5 and metrics["n_tokens"] == counts.sum().item()
    halves = [
        evaluate_answer_nll(model, tokenizer, num_samples=5, rank=r, world_size=2, progress=False)[1] for r in (0, 1)
    ]
    assert [r["item"] for r in halves[0]] == [0, 2, 4] and [r["item"] for r in halves[1]] == [1, 3]
    merged = sorted(halves[0] + halves[1], key=lambda r: r["item"])
    assert [r["answer_nll"] for r in merged] == pytest.approx(per_item)


def test_builtin_harm_pairs_answer_the_same_prompts_both_ways():
    pairs = load_harm_pairs("builtin:harmful-test", limit=6, seed=3)
    assert len(pairs) == 6 and len({p["prompt"] for p in pairs}) == 6
    for p in pairs:
        assert p["comply"].startswith(("Sure", "Of course", "Absolutely"))
        assert not p["refuse"].startswith(("Sure", "Of course", "Absolutely"))


def test_file_pairs_take_a_refusal_column_or_the_fixed_refusal(tmp_path):
    path = pairs_file(tmp_path)
    with_column = load_harm_pairs(path, limit=3, comply_field="comply", refuse_field="refuse")
    assert {p["refuse"] for p in with_column} == {"bbbb"}
    fixed = load_harm_pairs(path, limit=2, comply_field="comply", refusal="No.")
    assert [p["refuse"] for p in fixed] == ["No.", "No."] and fixed[0]["comply"] == "aaaa aaaa"
    with pytest.raises(ValueError, match="built-in"):
        load_harm_pairs("builtin:useful-test", limit=2)
    with pytest.raises(ValueError, match="limit"):
        load_harm_pairs(path, limit=0)
