"""`safeproj sweep SPEC --plan`: every cell checked offline with nothing downloaded, run or written, and the
estimate's arithmetic."""

from pathlib import Path

import pytest

from helpers.hub import offline_hub_cache
from safeproj.cli import main
from safeproj.commands.sweep.estimate import (
    BANDWIDTH_UTILISATION,
    DECODE_STEP_OVERHEAD_S,
    GPUS,
    Generation,
    Training,
    generation_seconds,
    gpu_class,
    training_seconds,
)
from safeproj.commands.sweep.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]
PAPER = ROOT / "recipes" / "sweeps" / "paper.yaml"


def test_the_paper_plan_lists_every_cell_offline_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with offline_hub_cache(tmp_path / "empty-hub"):  # nothing cached: the plan must not need the models
        main(["sweep", str(PAPER), "--plan", "--gpu", "h100-80gb"])
    out = capsys.readouterr().out
    for cell in load_spec(PAPER).cells:
        assert f"\n{cell.name} " in out
    assert "prerequisite: safety-tune Qwen/Qwen2.5-1.5B-Instruct" in out
    assert "10 cells × 3 seeds = 30 runs" in out and "GPU-hours on h100-80gb" in out
    assert "Qwen/Qwen2.5-1.5B-Instruct is not cached" in out and "OPENAI_API_KEY is not set" in out
    assert [p.name for p in tmp_path.iterdir()] == ["empty-hub"]  # no runs/ folder, no overrides
    # Beside the GPU-hours: what is downloaded, how many bases are built, how many judge calls are made.
    for model in ("Qwen/Qwen2.5-1.5B-Instruct", "Qwen/Qwen2.5-1.5B"):
        assert f"download: model {model} (≈ 3.1 GB in bf16)" in out
    for dataset in ("PKU-Alignment/BeaverTails", "meta-math/MetaMathQA", "openai/gsm8k", "walledai/AdvBench"):
        assert f"download: dataset {dataset}\n" in out
    assert "bases: 30 (reference × frac × selection)" in out  # 2 references × 5 fracs × 3 selections
    # 6 post hoc cells × 3 seeds × 16 scored models (15 variants + full) × 520 prompts, plus the 4 online
    # cells × 3 seeds × 520 prompts at train end.
    assert f"judge calls: at most {6 * 3 * 16 * 520 + 4 * 3 * 520:,} to gpt-4o-mini" in out


def test_an_unknown_gpu_class_is_one_line():
    with pytest.raises(ValueError, match="unknown GPU class 'v100'; known: a100-40gb"):
        gpu_class("v100")


def test_training_tokens_follow_epochs_steps_and_the_effective_batch():
    epoch = Training(examples=20000, epochs=1, max_steps=-1, effective_batch=32, max_length=512)
    assert (epoch.steps, epoch.tokens) == (625, 20000 * 512)
    capped = Training(examples=20000, epochs=1, max_steps=10, effective_batch=32, max_length=512)
    assert (capped.steps, capped.tokens) == (10, 10 * 32 * 512)
    partial = Training(examples=33, epochs=2, max_steps=-1, effective_batch=32, max_length=100)
    assert (partial.steps, partial.tokens) == (4, 2 * 33 * 100)  # a last partial batch is a step of 1 example


def test_gpu_seconds_are_tokens_over_the_assumed_throughput():
    gpu = GPUS["h100-80gb"]
    per_billion = 989e12 * 0.35 / 8e9
    assert gpu.train_tokens_per_s_per_billion == pytest.approx(per_billion)
    training = Training(examples=20000, epochs=1, max_steps=-1, effective_batch=32, max_length=512)
    assert training_seconds(training, 1.5, gpu) == pytest.approx(20000 * 512 * 1.5 / per_billion)
    gsm8k, advbench = Generation(1319, 64, 256), Generation(520, 64, 512)
    assert (gsm8k.decode_steps, advbench.decode_steps) == (21 * 256, 9 * 512)
    step = DECODE_STEP_OVERHEAD_S + 1.5e9 * 2 / (3.35e12 * BANDWIDTH_UTILISATION)
    assert generation_seconds([gsm8k, advbench, gsm8k], 1.5, gpu) == pytest.approx((2 * 21 * 256 + 9 * 512) * step)
