import hashlib
import json

import pytest
import torch
from safetensors.torch import save_file

from safeproj.core.deltas import (
    CheckpointDelta,
    LoraDelta,
    RunDelta,
    TensorDelta,
    delta_from_spec,
    select_names,
)
from safeproj.core.targets import find_weights, model_weights
from safeproj.core.tensor_files import SafetensorsFiles
from safeproj.model.loading import tiny_model

Q0 = "model.layers.0.self_attn.q_proj.weight"
# PEFT and transformers talk about embedding saves, lora_bias shapes and deprecations; not ours.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`"),
    pytest.mark.filterwarnings("ignore:Adapter 'default'"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


def state(seed):
    model, _ = tiny_model(seed=seed)
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def states():
    return state(0), state(1)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, states):
    base, tuned = states
    root = tmp_path_factory.mktemp("ckpt")
    save_file(base, str(root / "base.safetensors"))
    # The tuned side is a sharded Hugging Face directory.
    shard = root / "tuned"
    shard.mkdir()
    names = list(tuned)
    halves = {
        "model-00001-of-00002.safetensors": names[: len(names) // 2],
        "model-00002-of-00002.safetensors": names[len(names) // 2 :],
    }
    for file, keys in halves.items():
        save_file({k: tuned[k] for k in keys}, str(shard / file))
    weight_map = {k: file for file, keys in halves.items() for k in keys}
    (shard / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return shard, root / "base.safetensors"


def test_select_names_default_and_overrides():
    names = [
        "model.embed_tokens.weight",
        "model.layers.3.self_attn.q_proj.weight",
        "model.layers.3.self_attn.o_proj.weight",
        "model.layers.3.self_attn.o_proj.bias",
        "model.layers.3.mlp.down_proj.weight",
        "model.layers.3.input_layernorm.weight",
        "model.norm.weight",
        "lm_head.weight",
        "transformer.h.0.attn.c_attn.weight",
        "transformer.h.0.mlp.c_fc.weight",
        "gpt_neox.layers.1.attention.query_key_value.weight",
        "gpt_neox.layers.1.mlp.dense_4h_to_h.weight",
    ]
    assert select_names(names) == [
        "model.layers.3.self_attn.q_proj.weight",
        "model.layers.3.self_attn.o_proj.weight",
        "model.layers.3.mlp.down_proj.weight",
        "transformer.h.0.attn.c_attn.weight",
        "transformer.h.0.mlp.c_fc.weight",
        "gpt_neox.layers.1.attention.query_key_value.weight",
        "gpt_neox.layers.1.mlp.dense_4h_to_h.weight",
    ]
    assert select_names(names, include=[r"lm_head", r"embed"]) == ["model.embed_tokens.weight", "lm_head.weight"]
    assert select_names(names, exclude=r"mlp|h\.0") == [
        "model.layers.3.self_attn.q_proj.weight",
        "model.layers.3.self_attn.o_proj.weight",
        "gpt_neox.layers.1.attention.query_key_value.weight",
    ]
    with pytest.raises(ValueError, match="invalid include regex '\\('"):
        select_names(names, include="(")


def test_default_include_covers_the_tiny_llama(states):
    base, _ = states
    selected = select_names(base)
    assert len(selected) == 2 * 7
    assert all(base[n].ndim == 2 for n in selected)


def test_checkpoint_delta_streams_tensor_by_tensor(checkpoints, states, monkeypatch):
    tuned_dir, base_file = checkpoints
    base, tuned = states
    source = CheckpointDelta(tuned_dir, base_file)
    assert sorted(source.names()) == sorted(select_names(tuned))
    assert source.names()[:7] == [n for n in source.names() if ".layers.0." in n]  # layer order
    reads = []
    original = SafetensorsFiles.read
    monkeypatch.setattr(SafetensorsFiles, "read", lambda self, name: reads.append(name) or original(self, name))
    it = iter(source)
    name, delta = next(it)
    assert reads == [name, name]  # one tensor from each side, nothing else yet
    assert delta.dtype == torch.float32 and delta.device.type == "cpu"
    torch.testing.assert_close(delta, tuned[name] - base[name])
    for name, delta in it:
        torch.testing.assert_close(delta, tuned[name] - base[name])
        assert source.shape(name) == tuple(base[name].shape)
    assert len(reads) == 2 * len(source)


def test_checkpoint_delta_describe_hashes_the_files(checkpoints):
    tuned_dir, base_file = checkpoints
    info = CheckpointDelta(tuned_dir, base_file).describe()
    assert info["kind"] == "checkpoint"
    json.dumps(info)
    expected = hashlib.sha256(base_file.read_bytes()).hexdigest()
    assert info["files"][str(base_file)] == expected
    assert str(tuned_dir / "model.safetensors.index.json") in info["files"]
    assert len(info["files"]) == 4  # base, index, two shards


def test_checkpoint_delta_bf16_and_opt_in_embeddings(tmp_path, states):
    base, tuned = states
    save_file({k: v.bfloat16() for k, v in base.items()}, str(tmp_path / "b.safetensors"))
    save_file({k: v.bfloat16() for k, v in tuned.items()}, str(tmp_path / "t.safetensors"))
    source = CheckpointDelta(tmp_path / "t.safetensors", tmp_path / "b.safetensors", include=r"embed|norm")
    assert "model.embed_tokens.weight" in source.names() and "model.norm.weight" in source.names()
    name = "model.embed_tokens.weight"
    torch.testing.assert_close(source.get(name), tuned[name].bfloat16().float() - base[name].bfloat16().float())


def test_checkpoint_delta_errors(tmp_path, states):
    base, tuned = states
    save_file(base, str(tmp_path / "base.safetensors"))
    partial = {k: v for k, v in tuned.items() if k != Q0}
    save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match=f"{Q0}.*missing from .*partial.safetensors"):
        CheckpointDelta(tmp_path / "partial.safetensors", tmp_path / "base.safetensors")
    save_file({**tuned, Q0: torch.zeros(64, 65)}, str(tmp_path / "wide.safetensors"))
    with pytest.raises(ValueError, match=rf"{Q0}.*\(64, 65\)"):
        CheckpointDelta(tmp_path / "wide.safetensors", tmp_path / "base.safetensors")
    bad = dict(tuned)
    bad[Q0] = tuned[Q0].clone()
    bad[Q0][0, 0] = float("inf")
    save_file(bad, str(tmp_path / "inf.safetensors"))
    source = CheckpointDelta(tmp_path / "inf.safetensors", tmp_path / "base.safetensors")
    with pytest.raises(ValueError, match=f"{Q0}.*NaN or inf"):
        source.get(Q0)
    with pytest.raises(ValueError, match="neither a .safetensors file"):
        CheckpointDelta(tmp_path / "nowhere", tmp_path / "base.safetensors")
    with pytest.raises(ValueError, match="no tensors .* match"):
        CheckpointDelta(tmp_path / "base.safetensors", tmp_path / "base.safetensors", include="nothing-like-this")


def test_tied_head_saved_once(tmp_path, states):
    base, tuned = states
    tied_base = {k: v for k, v in base.items() if k != "lm_head.weight"}
    save_file(tied_base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    source = CheckpointDelta(tmp_path / "tuned.safetensors", tmp_path / "base.safetensors", include="lm_head")
    expected = tuned["lm_head.weight"] - base["model.embed_tokens.weight"]
    torch.testing.assert_close(source.get("lm_head.weight"), expected)


def test_tensor_delta(states):
    base, tuned = states
    source = TensorDelta(tuned, base)
    torch.testing.assert_close(source.get(Q0), tuned[Q0] - base[Q0])
    assert source.describe()["n_tensors"] == 14
    assert source.describe() != TensorDelta(base, tuned).describe()
    with pytest.raises(ValueError, match=f"{Q0}.*missing from the start"):
        TensorDelta(tuned, {k: v for k, v in base.items() if k != Q0})
    with pytest.raises(ValueError, match=f"{Q0}.*shape"):
        TensorDelta(tuned, {**base, Q0: torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="no tensor named 'nope'"):
        source.get("nope")


def make_adapter(path, seed=0, biased=False, **lora_kwargs):
    """Save a PEFT adapter with non-zero B on the tiny model; return (base state, merged state)."""
    from peft import LoraConfig, get_peft_model

    model, _ = tiny_model(seed=seed)
    if biased:  # projections with biases, for lora_bias
        from transformers import LlamaForCausalLM

        model.config.attention_bias = model.config.mlp_bias = True
        torch.manual_seed(seed)
        model = LlamaForCausalLM(model.config)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    peft_model = get_peft_model(model, LoraConfig(**lora_kwargs))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen))
    peft_model.save_pretrained(path)
    merged = {k: v.detach().clone() for k, v in peft_model.merge_and_unload().state_dict().items()}
    return base, merged


@pytest.mark.parametrize(
    "lora_kwargs",
    [
        {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
        {
            "r": 4,
            "lora_alpha": 8,
            "target_modules": ["q_proj", "v_proj", "up_proj"],
            "rank_pattern": {"v_proj": 2},
            "alpha_pattern": {"layers.1.self_attn.q_proj": 3},
        },
        {"r": 4, "lora_alpha": 6, "target_modules": ["o_proj", "gate_proj"], "use_rslora": True},
        {"r": 2, "lora_alpha": 4, "target_modules": ["o_proj", "up_proj"], "lora_bias": True, "biased": True},
    ],
    ids=["plain", "patterns", "rslora", "bias"],
)
def test_lora_delta_matches_merged_weights(tmp_path, lora_kwargs):
    base, merged = make_adapter(tmp_path, **lora_kwargs)
    source = LoraDelta(tmp_path, include=[r"\.weight$", r"\.bias$"])
    targets = lora_kwargs["target_modules"]
    expected_names = [n for n in base if any(f".{t}." in n for t in targets) and not torch.equal(base[n], merged[n])]
    assert sorted(source.names()) == sorted(expected_names)
    for name, delta in source:
        assert source.shape(name) == tuple(base[name].shape)
        torch.testing.assert_close(delta, merged[name] - base[name], atol=1e-5, rtol=1e-5)
    info = source.describe()
    assert info["kind"] == "lora" and len(info["files"]) == 2


def test_lora_embedding_adapter(tmp_path):
    base, merged = make_adapter(tmp_path, r=3, lora_alpha=6, target_modules=["embed_tokens"])
    source = LoraDelta(tmp_path, include="embed_tokens")
    assert source.names() == ["model.embed_tokens.weight"]
    name = "model.embed_tokens.weight"
    torch.testing.assert_close(source.get(name), merged[name] - base[name], atol=1e-5, rtol=1e-5)


def test_lora_delta_errors(tmp_path):
    make_adapter(tmp_path, r=2, target_modules=["q_proj"])
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="DoRA"):
        LoraDelta(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    save_file({"base_model.model.lm_head.weight": torch.ones(2, 2)}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="'base_model.model.lm_head.weight' is not a LoRA factor"):
        LoraDelta(tmp_path)
    with pytest.raises(ValueError, match="not a PEFT adapter"):
        LoraDelta(tmp_path / "elsewhere")


def test_delta_from_spec(tmp_path, checkpoints):
    tuned_dir, base_file = checkpoints
    assert isinstance(delta_from_spec(f"{tuned_dir},{base_file}"), CheckpointDelta)
    adapter = tmp_path / "adapter"
    make_adapter(adapter, r=2, target_modules=["q_proj"])
    assert isinstance(delta_from_spec(str(adapter)), LoraDelta)
    # A finished full fine-tuning run: its checkpoint dir names the starting weights.
    run = tmp_path / "run"
    (run / "checkpoint").mkdir(parents=True)
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    (base_dir / "model.safetensors").write_bytes(base_file.read_bytes())
    (run / "checkpoint" / "model.safetensors").write_bytes(base_file.read_bytes())
    info = {"model": "tiny", "base": str(base_dir), "lora": False, "recipe": "t", "global_step": 3}
    (run / "checkpoint" / "safeproj.json").write_text(json.dumps(info))
    source = delta_from_spec(str(run))
    assert isinstance(source, CheckpointDelta) and source.describe()["base"] == str(base_dir)
    assert source.get(Q0).abs().max() == 0  # identical weights
    # A LoRA run's checkpoint is an adapter.
    lora_run = tmp_path / "lora_run"
    make_adapter(lora_run, r=2, target_modules=["q_proj"])
    (lora_run / "safeproj.json").write_text(json.dumps({**info, "lora": True}))
    assert isinstance(delta_from_spec(str(lora_run)), LoraDelta)
    (run / "checkpoint" / "safeproj.json").write_text(json.dumps({**info, "base": "tiny"}))
    with pytest.raises(ValueError, match="starts from 'tiny'"):
        delta_from_spec(str(run))
    for bad in (str(tmp_path / "nothing"), "a,b,c"):
        with pytest.raises(ValueError, match="delta"):
            delta_from_spec(bad)


def trained_tiny(seed: int = 3):
    """The tiny model, its projection weights as targets, their start, after a random 'training' step."""
    model, _ = tiny_model()
    targets = find_weights(model, select_names([n for n, _ in model.named_parameters()]))
    start = {t.name: t.weight.detach().clone() for t in targets}
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in targets:
            t.weight.add_(torch.randn(t.weight.shape, generator=gen))
    return model, targets, start


def test_run_delta_reads_the_start_from_disk_where_it_can(tmp_path):
    model, _ = tiny_model()
    targets = find_weights(model, select_names([n for n, _ in model.named_parameters()]))
    start = {t.name: t.weight.detach().clone() for t in targets}
    # The start folder holds every target but one, and one with another shape.
    missing, reshaped = targets[0].name, targets[1].name
    on_disk = {n: t for n, t in start.items() if n != missing}
    on_disk[reshaped] = torch.zeros(3, 3)
    save_file(on_disk, str(tmp_path / "model.safetensors"))
    run = RunDelta(targets, tmp_path)
    assert set(run.held) == {missing, reshaped}
    assert set(run.on_disk) == set(start) - {missing, reshaped}
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for t in targets:
            t.weight.add_(torch.randn(t.weight.shape, generator=gen))
    for t in targets:
        torch.testing.assert_close(run.get(t.name), t.weight.detach() - start[t.name], rtol=0, atol=0)
        assert run.shape(t.name) == tuple(t.weight.shape)
    # Without a readable start folder every start is held.
    assert set(RunDelta(targets, tmp_path / "nowhere").held) == set(start)


def test_run_delta_held_copies_restore_the_start():
    _, targets, start = trained_tiny()
    run = RunDelta(targets, held=start)  # as after a resume: the weights have moved
    name = targets[0].name
    torch.testing.assert_close(run.get(name), targets[0].weight.detach() - start[name], rtol=0, atol=0)
    assert run.start(name) is start[name]
    now = torch.zeros_like(start[name])
    torch.testing.assert_close(run.update(name, now=now), -start[name], rtol=0, atol=0)


def test_run_delta_of_lora_pairs_is_the_merged_change():
    from peft import LoraConfig, get_peft_model

    model, _ = tiny_model()
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj"]))
    targets = [t for t in model_weights(model)[0].values() if t.is_lora]
    with torch.no_grad():
        for t in targets:
            t.lora_b.normal_()  # a started adapter: B₀ ≠ 0
    run, fresh = RunDelta(targets), RunDelta(targets, fresh_adapters=True)
    start = {t.name: t.delta_weight() for t in targets}
    assert set(run.held) == {f"{t.name}::{part}" for t in targets for part in "BA"} and not fresh.held
    with torch.no_grad():
        for t in targets:
            t.lora_a.add_(1.0)
    for t in targets:
        torch.testing.assert_close(run.get(t.name), t.delta_weight() - start[t.name])
        torch.testing.assert_close(fresh.get(t.name), t.delta_weight())
        assert run.shape(t.name) == tuple(t.delta_weight().shape)
