"""Response-only labels, end-of-turn handling, truncation and prompt formatting."""

import pytest

from safeproj.data.templates import (
    IGNORE_INDEX,
    encode_prompt,
    encode_prompt_marked,
    encode_text,
    format_example,
    format_prompt,
)
from safeproj.model.loading import tiny_tokenizer

PROMPT = "Tom has 3 apples and buys 4 more. How many apples does he have?"
RESPONSE = "He has 3 + 4 = 7 apples.\n#### 7"


def labelled(example):
    return [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]


def n_masked_prefix(example):
    labels = example["labels"]
    return next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)


def check_response_only(tok, example, expected_tail):
    ids, labels = example["input_ids"], example["labels"]
    assert len(ids) == len(labels) == len(example["attention_mask"])
    assert example["attention_mask"] == [1] * len(ids)
    start = n_masked_prefix(example)
    # Prompt positions are all masked, every later position copies its input id exactly.
    assert all(label == IGNORE_INDEX for label in labels[:start])
    assert labels[start:] == ids[start:]
    assert tok.decode(labelled(example)) == expected_tail


def test_alpaca_template_labels_only_response_and_eos(tiny_tok):
    example = format_example(tiny_tok, PROMPT, RESPONSE, max_length=512)
    check_response_only(tiny_tok, example, RESPONSE + "</s>")
    assert example["input_ids"][-1] == tiny_tok.eos_token_id
    # The masked part is exactly the generation prompt that evaluation will feed the model.
    start = n_masked_prefix(example)
    assert example["input_ids"][:start] == encode_prompt(tiny_tok, PROMPT)
    assert tiny_tok.decode(example["input_ids"][:start]).endswith("### Response:\n")


def test_missing_chat_template_falls_back_to_alpaca(tiny_tok):
    bare = tiny_tokenizer()
    bare.chat_template = None
    assert format_example(bare, PROMPT, RESPONSE, 512) == format_example(tiny_tok, PROMPT, RESPONSE, 512)
    assert format_prompt(bare, PROMPT) == f"### Instruction:\n{PROMPT}\n\n### Response:\n"


def test_chatml_with_control_tokens(chatml_tok):
    example = format_example(chatml_tok, PROMPT, RESPONSE, max_length=512)
    check_response_only(chatml_tok, example, RESPONSE + "<|im_end|>")
    end = chatml_tok.convert_tokens_to_ids("<|im_end|>")
    # One control token closes the turn; the newline that only separates turns is not trained.
    assert example["input_ids"][-1] == end == chatml_tok.eos_token_id
    start = n_masked_prefix(example)
    assert chatml_tok.decode(example["input_ids"][:start]).endswith("<|im_start|>assistant\n")
    assert example["input_ids"][:start] == encode_prompt(chatml_tok, PROMPT)


def test_chatml_marker_that_is_not_eos_is_learned(chatml_plain_tok):
    example = format_example(chatml_plain_tok, PROMPT, RESPONSE, max_length=512)
    check_response_only(chatml_plain_tok, example, RESPONSE + "<|im_end|>")
    assert chatml_plain_tok.eos_token_id not in example["input_ids"]


def test_template_without_end_marker_gets_eos(tiny_tok):
    tiny_tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}User: {{ m['content'] }}\n"
        "{% else %}Assistant: {{ m['content'] }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}Assistant: {% endif %}"
    )
    example = format_example(tiny_tok, PROMPT, RESPONSE, max_length=512)
    check_response_only(tiny_tok, example, RESPONSE + "</s>")
    assert example["input_ids"][-1] == tiny_tok.eos_token_id


def test_template_that_rewrites_the_answer_falls_back_to_raw_response(tiny_tok):
    tiny_tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] }}\n"
        "{% else %}A: {{ m['content'] | upper }}{{ eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}A: {% endif %}"
    )
    example = format_example(tiny_tok, PROMPT, RESPONSE, max_length=512)
    check_response_only(tiny_tok, example, RESPONSE + "</s>")


def test_merge_across_boundary_masks_the_straddling_token(tiny_tok):
    # "\nHe" becomes one token, so the prompt's tokens are no longer a prefix of the full text's.
    tiny_tok.add_tokens(["\nHe"])
    merged = tiny_tok.convert_tokens_to_ids("\nHe")
    example = format_example(tiny_tok, PROMPT, RESPONSE, max_length=512)
    assert merged in example["input_ids"]
    start = n_masked_prefix(example)
    assert example["input_ids"][start - 1] == merged  # carries the prompt's "\n": masked
    check_response_only(tiny_tok, example, RESPONSE[len("He") :] + "</s>")


def test_truncation_cuts_the_response_end(tiny_tok):
    full = format_example(tiny_tok, PROMPT, RESPONSE, max_length=512)
    n_prompt = n_masked_prefix(full)
    for keep in (1, 5, len(RESPONSE)):
        cut = format_example(tiny_tok, PROMPT, RESPONSE, max_length=n_prompt + keep)
        assert len(cut["input_ids"]) == n_prompt + keep
        assert cut["input_ids"] == full["input_ids"][: n_prompt + keep]
        assert tiny_tok.decode(labelled(cut)) == (RESPONSE + "</s>")[:keep]


def test_prompt_that_fills_max_length_is_dropped(tiny_tok):
    n_prompt = len(encode_prompt(tiny_tok, PROMPT))
    assert format_example(tiny_tok, PROMPT, RESPONSE, max_length=n_prompt) is None
    assert format_example(tiny_tok, PROMPT, RESPONSE, max_length=n_prompt - 10) is None
    assert len(labelled(format_example(tiny_tok, PROMPT, RESPONSE, max_length=n_prompt + 1))) == 1


def test_format_prompt_uses_the_generation_prompt(tiny_tok, chatml_tok):
    assert format_prompt(tiny_tok, "Hi") == "### Instruction:\nHi\n\n### Response:\n"
    assert format_prompt(chatml_tok, "Hi") == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize(
    "args, match",
    [
        (("p", "r", 1), "max_length"),
        (("p", "r", "64"), "max_length"),
        ((None, "r", 64), "prompt must be a string"),
        (("p", 7, 64), "response must be a string"),
    ],
)
def test_bad_input_is_one_line(tiny_tok, args, match):
    with pytest.raises(ValueError, match=match):
        format_example(tiny_tok, *args)


def test_history_turns_come_before_the_prompt(tiny_tok, chatml_tok):
    for tok in (tiny_tok, chatml_tok):
        shots = [("Q1", "A1"), ("Q2", "A2")]
        text = format_prompt(tok, "Q3", history=shots)
        messages = [{"role": r, "content": c} for q, a in shots for r, c in (("user", q), ("assistant", a))]
        rendered = tok.apply_chat_template(
            [*messages, {"role": "user", "content": "Q3"}], tokenize=False, add_generation_prompt=True
        )
        assert text == rendered
        assert text.index("Q1") < text.index("A1") < text.index("Q2") < text.index("A2") < text.index("Q3")


@pytest.mark.parametrize("fixture", ["tiny_tok", "chatml_tok"])
def test_assistant_marker_is_the_generation_prompt(fixture, request):
    tok = request.getfixturevalue(fixture)
    ids, start = encode_prompt_marked(tok, PROMPT)
    assert ids == encode_prompt(tok, PROMPT)
    marker = format_prompt(tok, PROMPT)[
        len(tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False)) :
    ]
    assert tok.decode(ids[start:]) == marker and marker.strip()


def test_one_tokenisation_for_every_prompt_reader(chatml_tok):
    # A tokenizer that would add BOS by itself: training, evaluation and recording all leave it out.
    from tokenizers.processors import TemplateProcessing

    chatml_tok._tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", chatml_tok.bos_token_id)]
    )
    assert chatml_tok(PROMPT)["input_ids"][0] == chatml_tok.bos_token_id
    example = format_example(chatml_tok, PROMPT, RESPONSE, max_length=512)
    trained = example["input_ids"][: n_masked_prefix(example)]
    assert encode_prompt(chatml_tok, PROMPT) == trained
    assert encode_text(chatml_tok, format_prompt(chatml_tok, PROMPT)) == trained
    assert encode_prompt_marked(chatml_tok, PROMPT)[0] == trained
    assert chatml_tok.bos_token_id not in trained
