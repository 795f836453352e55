"""`eval_command`: presets, LoRA adapter directories, JSON output, LLM judge wiring."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model

from helpers.evaluation import SECRET, spread_weights
from safeproj.commands.eval import eval_command, load_for_eval
from safeproj.model.loading import load_model


def refuse_constant(name: str):
    raise ValueError(f"{name} is not strict JSON")


SMALL = {"num_samples": 2, "utility_max_new_tokens": 4, "harm_max_new_tokens": 4, "batch_size": 2, "device": "cpu"}


def test_preset_prints_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "res" / "eval.json"
    result = eval_command("tiny", out=str(out), **SMALL)
    printed = capsys.readouterr().out
    assert "utility/strict_acc" in printed and "harm/refusal_rate" in printed and "95% CI" in printed
    saved = json.loads(out.read_text(), parse_constant=refuse_constant)  # strict JSON: NaN is written as null
    assert saved["metrics"]["utility"]["n"] == 2 and saved["metrics"]["harm"]["n"] == 2
    assert len(saved["rows"]["utility"]) == 2 and len(saved["rows"]["harm"]) == 2
    assert saved["judge"] == "RefusalJudge()"
    assert result["metrics"]["utility"]["strict_acc"] == saved["metrics"]["utility"]["strict_acc"]
    assert not list(out.parent.glob(".*tmp"))  # no temp file left behind


def test_only_harm_with_llm_judge(judge_server, api_key, tmp_path):
    result = eval_command(
        "tiny",
        utility=False,
        judge_base_url=judge_server.base_url,
        judge_model=judge_server.model,
        judge_api_key_env=api_key,
        judge_cache=str(tmp_path / "cache.sqlite"),
        out=str(tmp_path / "o.json"),
        **SMALL,
    )
    assert "utility" not in result["metrics"]
    assert result["metrics"]["harm"]["mean_score"] == 3.0  # the loopback server's default score
    assert judge_server.requests == 2
    assert SECRET not in (tmp_path / "o.json").read_text()


def test_lora_adapter_dir_is_merged_into_its_base(tmp_path):
    base, tok = load_model("tiny")
    spread_weights(base, seed=4)
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    lora = get_peft_model(base, config)
    adapter_dir = tmp_path / "adapter"
    lora.save_pretrained(adapter_dir)
    (adapter_dir / "safeproj.json").write_text(json.dumps({"model": "tiny", "base": str(base_dir), "lora": True}))

    merged, merged_tok = load_for_eval(str(adapter_dir), device="cpu")
    ids = torch.tensor([tok("What is 2 + 2?", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        want = lora(input_ids=ids).logits
        got = merged(input_ids=ids).logits
        plain = load_model(str(base_dir))[0](input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(plain, want, atol=1e-3)  # the adapter really changes the model
    assert merged_tok.chat_template == tok.chat_template


def test_bad_arguments():
    with pytest.raises(ValueError, match="judge_model"):
        eval_command("tiny", judge_base_url="http://127.0.0.1:9/v1")
    with pytest.raises(ValueError, match="nothing to do"):
        eval_command("tiny", utility=False, harm=False)
    with pytest.raises(ValueError, match="unknown model"):
        eval_command("not-a-model", **SMALL)
