"""Shared test set-up: offline, quiet, one torch thread, and a private cache so tests never see a user's files."""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    # Converted models and built bases go to a throwaway cache unless the caller pinned one.
    if "SAFEPROJ_CACHE_FOR_TESTS" in os.environ:
        os.environ["SAFEPROJ_CACHE"] = os.environ["SAFEPROJ_CACHE_FOR_TESTS"]
    else:
        os.environ["SAFEPROJ_CACHE"] = str(tmp_path_factory.mktemp("safeproj-cache"))
    yield


@pytest.fixture(scope="session", autouse=True)
def _repository_untouched():
    # Tests write under tmp_path: a file left in the source tree would be committed by accident.
    root = Path(__file__).resolve().parents[1]
    ignored = {".pytest_cache", ".ruff_cache", "__pycache__", "runs", "wandb", "lightning_logs", ".venv", ".git"}

    def listing():
        return {p.name for p in root.iterdir() if p.name not in ignored}

    before = listing()
    yield
    added = sorted(listing() - before)
    assert not added, f"tests left files in the repository root: {added}"


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    # The test models and matrices are tiny: thread start-up costs more than it saves, and on a shared
    # 2-core machine busy-waiting threads slow every test down many times over.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def judge_server():
    from helpers.loopback import LoopbackJudgeServer

    with LoopbackJudgeServer(hang=0.6) as server:
        yield server


@pytest.fixture
def api_key(monkeypatch):
    from helpers.evaluation import SECRET

    monkeypatch.setenv("SAFEPROJ_TEST_JUDGE_KEY", SECRET)
    return "SAFEPROJ_TEST_JUDGE_KEY"


@pytest.fixture
def tiny():
    from helpers.evaluation import spread_weights
    from safeproj.model.loading import load_model

    model, tokenizer = load_model("tiny")
    return spread_weights(model), tokenizer


@pytest.fixture
def tiny_lm():
    from helpers.activations import TinyTrainingLM

    return TinyTrainingLM


@pytest.fixture
def prompt_files(tmp_path):
    """(name → path of the harmful jsonl and benign csv prompt sets, harmful prompts, benign prompts)."""
    from helpers.activations import BENIGN, HARMFUL, write_prompt_files

    return write_prompt_files(tmp_path), list(HARMFUL), list(BENIGN)


@pytest.fixture
def spectrum_calls(monkeypatch):
    """The shapes of every factorization `side_spectrum` is asked for during the test."""
    from safeproj.core import spectrum as core_spectrum

    calls = []
    real = core_spectrum.side_spectrum

    def counting(delta, side="left", method="auto"):
        calls.append(tuple(delta.shape))
        return real(delta, side=side, method=method)

    monkeypatch.setattr(core_spectrum, "side_spectrum", counting)
    return calls


@pytest.fixture
def checkpoint_pair(tmp_path):
    """Specs of two deltas `A,BASE` and `B,BASE` over two Llama-shaped layers (random updates)."""
    from helpers.overlap import gaussian, llama_shapes, write_checkpoint

    shapes = llama_shapes()
    base = gaussian(shapes, seed=0, scale=0.02)
    tuned = {}
    for label, seed in (("a", 1), ("b", 2)):
        update = gaussian(shapes, seed=seed, scale=1e-2)
        tuned[label] = write_checkpoint(tmp_path / label, {n: base[n] + update[n] for n in shapes})
    base_dir = write_checkpoint(tmp_path / "base", base)
    return f"{tuned['a']},{base_dir}", f"{tuned['b']},{base_dir}"
