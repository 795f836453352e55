"""Hub checkpoints from a local Hugging Face cache: `org/name[@revision]` in delta specs, alignment presets and
model loading, offline; a model missing from the cache fails at once with one line."""

import hashlib

import pytest
import torch

from helpers.hub import cache_model, offline_hub_cache, repo_folder
from safeproj.core.deltas import select_names
from safeproj.model import hub
from safeproj.model.loading import load_model, resolve, tiny_model
from safeproj.model.module import SafeprojLM
from safeproj.model.subspaces import ALIGNMENT_PAIRS, checkpoint_path, delta_source, expand_spec

INSTRUCT, BASE = ALIGNMENT_PAIRS["qwen2.5-1.5b"]


@pytest.fixture
def hub_cache(tmp_path):
    """An empty hub cache in force for the test (HF_HUB_CACHE), offline."""
    with offline_hub_cache(tmp_path / "hf-hub") as cache:
        yield cache


@pytest.fixture
def paper_pair(hub_cache):
    """Tiny stand-ins saved as the paper's Qwen2.5-1.5B pair; the instruct one sharded. (instruct, base) state dicts."""
    (instruct, tok), (base, _) = tiny_model(seed=1), tiny_model(seed=0)
    cache_model(hub_cache, INSTRUCT, instruct, tok, max_shard_size="100KB")
    cache_model(hub_cache, BASE, base, tok)
    return instruct.state_dict(), base.state_dict()


def test_hub_pair_resolves_offline_and_gives_the_exact_delta(paper_pair, hub_cache):
    tuned, base = paper_pair
    snapshot = next((repo_folder(hub_cache, INSTRUCT) / "snapshots").iterdir())
    assert (snapshot / "model.safetensors.index.json").is_file()  # the sharded reader is exercised
    source = delta_source(f"{INSTRUCT},{BASE}")
    assert sorted(source.names()) == sorted(select_names(tuned))  # the default tensor set
    for name, delta in source:
        assert torch.equal(delta, tuned[name] - base[name]), name
    # The paper's named subspace is the same pair.
    named = delta_source(expand_spec("alignment", INSTRUCT))
    assert expand_spec("alignment", INSTRUCT) == "alignment:qwen2.5-1.5b"
    assert named.describe() == source.describe()


def test_revisions_pick_their_snapshot(hub_cache):
    (first, tok), (second, _) = tiny_model(seed=0), tiny_model(seed=2)
    main = cache_model(hub_cache, BASE, first, tok)
    commit = hashlib.sha1(b"v2").hexdigest()
    tagged = cache_model(hub_cache, BASE, second, tok, revision="v2", commit=commit)
    assert resolve(BASE) == str(main)
    assert resolve(f"{BASE}@v2") == str(tagged)
    assert checkpoint_path(f"{BASE}@{commit}") == str(tagged)
    delta = delta_source(f"{BASE}@v2,{BASE}")
    name = delta.names()[0]
    assert torch.equal(delta.get(name), second.state_dict()[name] - first.state_dict()[name])


def test_model_loads_from_the_cache(paper_pair, hub_cache):
    _, base = paper_pair
    model, tok = load_model(BASE)
    name = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(model.state_dict()[name], base[name])
    assert tok.decode(tok("2+2=4")["input_ids"], skip_special_tokens=True) == "2+2=4"
    # A run from a hub model reads its start W₀ from the cached snapshot: no copy of the weights is made.
    snapshot = next((repo_folder(hub_cache, BASE) / "snapshots").iterdir())
    assert SafeprojLM(model=BASE).base_dir == str(snapshot.resolve())


def test_missing_model_fails_at_once_naming_it_and_the_cache(hub_cache, monkeypatch):
    import huggingface_hub

    calls = []
    real = huggingface_hub.snapshot_download

    def spy(*args, **kwargs):
        calls.append(kwargs.get("local_files_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    seven_b = ALIGNMENT_PAIRS["qwen2.5-7b"][0]
    for attempt in (lambda: delta_source("alignment:qwen2.5-7b"), lambda: load_model(seven_b)):
        with pytest.raises(ValueError) as err:
            attempt()
        message = str(err.value)
        assert "\n" not in message
        assert seven_b in message and str(hub_cache) in message and "HF_HUB_CACHE" in message
        assert "HF_HUB_OFFLINE=1" in message
    assert calls and all(calls)  # the cache was asked, the hub never


def test_incomplete_snapshot_counts_as_missing(paper_pair, hub_cache):
    snapshot = next((repo_folder(hub_cache, INSTRUCT) / "snapshots").iterdir())
    next(snapshot.glob("model-*.safetensors")).unlink()  # an interrupted download lost a shard
    with pytest.raises(hub.HubModelMissing, match="Qwen2.5-1.5B-Instruct"):
        delta_source("alignment:qwen2.5-1.5b")


def test_local_folders_shaped_like_hub_names_stay_local(tmp_path, monkeypatch, hub_cache):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "ckpt").mkdir(parents=True)
    assert not hub.is_hub_name("runs/ckpt") and checkpoint_path("runs/ckpt") == "runs/ckpt"
    assert hub.is_hub_name("org/name@refs/pr/1") and hub.split_name("org/name@refs/pr/1") == ("org/name", "refs/pr/1")
    assert not hub.is_hub_name("./org/name") and not hub.is_hub_name("a/b/c")


def test_unknown_alignment_presets_list_the_known_ones():
    with pytest.raises(ValueError, match="llama-2-7b"):
        delta_source("alignment:mistral-7b")
    with pytest.raises(ValueError, match="'tiny'"):
        expand_spec("alignment", "tiny")
