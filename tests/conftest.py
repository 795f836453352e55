"""Shared test set-up: offline, quiet, and a private cache so tests never see a user's files."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    # Converted models and built bases go to a throwaway cache unless the caller pinned one.
    if "SAFEPROJ_CACHE_FOR_TESTS" in os.environ:
        os.environ["SAFEPROJ_CACHE"] = os.environ["SAFEPROJ_CACHE_FOR_TESTS"]
    else:
        os.environ["SAFEPROJ_CACHE"] = str(tmp_path_factory.mktemp("safeproj-cache"))
    yield
