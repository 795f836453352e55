"""Tensor names: block index and module type read exactly, one layer label for every table and plot."""

import pytest

from safeproj.core.names import layer_of, layer_sort_key, parse_name


@pytest.mark.parametrize(
    ("name", "layer", "module"),
    [
        ("model.layers.3.self_attn.q_proj.weight", 3, "q"),
        ("model.layers.12.mlp.gate_proj.weight", 12, "gate"),
        ("model.layers.0.mlp.down_proj.base_layer.weight", 0, "down"),
        ("transformer.h.5.attn.c_proj.weight", 5, "c_proj"),
        ("model.layers_norm.weight", None, "layers_norm"),
        ("model.player.q_proj.weight", None, "q"),
        ("model.relayers.2.q_proj.weight", None, "q"),
        ("model.layers.x.q_proj.weight", None, "q"),
        ("lm_head.weight", None, "lm_head"),
    ],
)
def test_names_parse_exactly(name, layer, module):
    assert parse_name(name) == (layer, module)


def test_layer_of():
    assert layer_of("model.layers.12.mlp.up_proj.weight") == "layer_12"
    assert layer_of("transformer.h.3.attn.c_attn.weight") == "layer_3"
    assert layer_of("lm_head.weight") == "lm_head"


def test_layer_labels_sort_by_block_then_name():
    labels = ["lm_head", "layer_10", "layer_2", "embed"]
    assert sorted(labels, key=layer_sort_key) == ["layer_2", "layer_10", "embed", "lm_head"]
