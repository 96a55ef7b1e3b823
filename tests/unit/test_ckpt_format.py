"""Unit checks of the checkpoint key-name rules (mvlm/convert/ckpt_format.py, models/spec.py).

The end-to-end proof (torch_dist files written and loaded across specs, bit-exact) is
tests/dist/test_ckpt_te_names.py; these pin the rules themselves.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

LM = "language_model.decoder.layers."


def test_keys_map_dense_and_moe():
    from mvlm.models.spec import te_checkpoint_keys_map

    assert te_checkpoint_keys_map(is_moe=False) == {
        "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
        "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}
    # TE keeps a separate TENorm before a MoE block: only the attention norm is fused
    assert te_checkpoint_keys_map(is_moe=True) == {
        "input_layernorm.": "self_attention.linear_qkv.layer_norm_"}


def test_local_layer_spec_declares_the_map():
    from megatron.core.transformer.transformer_config import TransformerConfig

    from mvlm.models.spec import local_layer_spec

    dense = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4)
    moe = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4,
                            num_moe_experts=4, moe_ffn_hidden_size=32)
    assert set(local_layer_spec(dense).submodules.sharded_state_dict_keys_map) == {
        "input_layernorm.", "pre_mlp_layernorm."}
    assert set(local_layer_spec(moe).submodules.sharded_state_dict_keys_map) == {
        "input_layernorm."}


@pytest.mark.parametrize("key,old", [
    (LM + "self_attention.linear_qkv.layer_norm_weight", LM + "input_layernorm.weight"),
    (LM + "self_attention.linear_qkv.layer_norm_bias", LM + "input_layernorm.bias"),
    (LM + "mlp.linear_fc1.layer_norm_weight", LM + "pre_mlp_layernorm.weight"),
    ("decoder.layers.mlp.linear_fc1.layer_norm_weight", "decoder.layers.pre_mlp_layernorm.weight"),
    (LM + "self_attention.linear_qkv.weight", None),
    (LM + "pre_mlp_layernorm.weight", None),  # MoE: the TE name already
    ("language_model.decoder.final_layernorm.weight", None),
    ("vision_model.tower.blocks.0.norm1.weight", None),
])
def test_legacy_key(key, old):
    from mvlm.convert.ckpt_format import legacy_key

    assert legacy_key(key) == old


@pytest.mark.parametrize("key,want", [
    (LM + "self_attention.linear_qkv._extra_state", True),
    (LM + "mlp.experts.experts.linear_fc1._extra_state", True),
    ("language_model.decoder.final_layernorm._extra_state", True),
    ("fc1._extra_state3", True),
    (LM + "self_attention.linear_qkv.layer_norm_weight", False),
    ("x.my_extra_state", False),
])
def test_is_extra_state(key, want):
    from mvlm.convert.ckpt_format import is_extra_state

    assert is_extra_state(key) is want


def test_format_meta_and_version():
    from mvlm.convert.ckpt_format import (
        FORMAT_VERSION,
        CheckpointFormatError,
        format_meta,
        format_version,
    )

    assert format_meta("local") == {"format_version": FORMAT_VERSION, "layer_spec": "local"}
    with pytest.raises(ValueError, match="layer spec"):
        format_meta("apex")
    assert format_version({}, Path("c")) == 1
    assert format_version({"format_version": 2}, Path("c")) == 2
    for bad in (0, 3, True, "2", 2.0):
        with pytest.raises(CheckpointFormatError, match="format_version"):
            format_version({"format_version": bad}, Path("c"))


class _TELikeNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(3))

    def get_extra_state(self):
        return torch.zeros(2, dtype=torch.uint8)

    def set_extra_state(self, state):
        self.got = state


def test_load_module_state_allows_only_missing_extra_state():
    from mvlm.convert.ckpt_format import CheckpointFormatError, load_module_state

    m = nn.Sequential(nn.Linear(3, 3), _TELikeNorm())
    sd = {k: v.clone() + 1 for k, v in m.state_dict().items() if not k.endswith("_extra_state")}
    load_module_state(m, sd)
    assert torch.equal(m[0].weight, sd["0.weight"]) and not hasattr(m[1], "got")
    with pytest.raises(CheckpointFormatError, match="missing 0.bias"):
        load_module_state(m, {k: v for k, v in sd.items() if k != "0.bias"})
    with pytest.raises(CheckpointFormatError, match="unexpected 1.bias"):
        load_module_state(m, {**sd, "1.bias": torch.zeros(3)})
    load_module_state(m, {"0.weight": sd["0.weight"]}, strict=False)  # adapter runs
