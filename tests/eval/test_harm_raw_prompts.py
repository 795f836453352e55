"""Raw AdvBench prompts (the paper's protocol): no chat template, the tokenizer's own BOS where it adds one."""

import pytest
from tokenizers.processors import TemplateProcessing

import safeproj.eval.harm as harm
from safeproj.callbacks import HarmEval
from safeproj.data.templates import encode_text, format_prompt, raw_prompt
from safeproj.model.loading import tiny_model, tiny_tokenizer


@pytest.mark.parametrize("chat_template", [True, False])
def test_the_raw_path_encodes_the_prompt_without_template_tokens(chat_template, monkeypatch):
    model, tok = tiny_model()
    seen = []
    real = harm.generate

    def recording(model, tokenizer, prompts, *args, **kwargs):
        seen.extend(prompts)
        return real(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(harm, "generate", recording)
    _, rows = harm.evaluate_harm(
        model, tok, num_samples=2, max_new_tokens=2, progress=False, chat_template=chat_template
    )
    prompts = [row["prompt"] for row in rows]
    if chat_template:
        assert seen == [format_prompt(tok, p) for p in prompts] and seen != prompts
    else:
        assert seen == prompts
        assert [encode_text(tok, p) for p in seen] == [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]


def test_a_tokenizer_that_adds_bos_gets_it_on_raw_prompts():
    tok = tiny_tokenizer()
    assert raw_prompt(tok, "Do harm") == "Do harm"  # the tiny tokenizer adds no special tokens
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)]
    )
    text = raw_prompt(tok, "Do harm")
    assert text == "<s>Do harm" and encode_text(tok, text) == tok("Do harm")["input_ids"]
    assert raw_prompt(tok, text) == text  # never twice


def test_harm_eval_passes_the_option_and_keeps_old_state_keys():
    assert HarmEval().chat_template and "chat_template" not in HarmEval().state_key
    raw = HarmEval(chat_template=False)
    assert not raw.chat_template and raw.state_key != HarmEval().state_key
