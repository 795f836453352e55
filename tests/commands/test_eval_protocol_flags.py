"""The paper's evaluation protocol from the command line: GSM8k `--protocol lm-eval` and raw AdvBench prompts
(`--harm_chat_template false`) reach the evaluators of `safeproj eval` and `safeproj project`."""

import pytest

import safeproj.commands.eval as eval_module
from safeproj.commands.dispatch import parse_command, run_command
from safeproj.commands.project import variant_evaluators

SMALL = ["--num_samples", "1", "--utility_max_new_tokens", "2", "--harm_max_new_tokens", "2", "--device", "cpu"]


def test_eval_passes_the_protocol_and_raw_prompts_to_the_evaluators(monkeypatch, capsys):
    seen = {}

    def recorder(name, real):
        def call(*args, **kwargs):
            seen[name] = kwargs
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr(eval_module, "evaluate_gsm8k", recorder("gsm8k", eval_module.evaluate_gsm8k))
    monkeypatch.setattr(eval_module, "evaluate_harm", recorder("harm", eval_module.evaluate_harm))
    flags = ["--protocol", "lm-eval", "--comparison", "numeric", "--n_shot", "1", "--harm_chat_template", "false"]
    result = run_command("eval", ["--model", "tiny", *SMALL, *flags])
    assert (seen["gsm8k"]["protocol"], seen["gsm8k"]["comparison"], seen["gsm8k"]["n_shot"]) == (
        "lm-eval",
        "numeric",
        1,
    )
    assert seen["harm"]["chat_template"] is False
    assert result["settings"]["protocol"] == "lm-eval" and result["settings"]["harm_chat_template"] is False


def test_eval_refuses_an_unknown_protocol_before_loading_a_model():
    with pytest.raises(ValueError, match="--protocol must be one of chat, lm-eval"):
        run_command("eval", ["--model", "no/such-model", "--protocol", "lm_eval"])


def test_project_builds_its_evaluators_from_the_flags():
    args = parse_command("project", ["--run", "r", "--subspace", "s", "--protocol", "lm-eval", "--n_shot", "1",
                                     "--harm_chat_template", "false", "--utility_dataset", "openai/gsm8k"])  # fmt: skip
    assert (args.protocol, args.n_shot, args.harm_chat_template) == ("lm-eval", 1, False)
    utility, harm = variant_evaluators(
        True, True, args.utility_dataset, args.harm_dataset, 1319, args.n_shot, args.protocol, 256, 512, False, 64
    )
    assert (utility.protocol, utility.n_shot, utility.dataset, utility.num_samples) == (
        "lm-eval",
        1,
        "openai/gsm8k",
        1319,
    )
    assert (harm.chat_template, harm.max_new_tokens, harm.batch_size) == (False, 512, 64)
