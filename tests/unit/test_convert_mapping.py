"""Mapping primitives: loading every TP shard and exporting the gathered tensor must give the
original HF tensors back exactly, for every TP size that divides the shapes."""
from __future__ import annotations

import pytest
import torch

from mvlm.convert.mapping import (
    QKV,
    Column,
    GatedMLP,
    Replicated,
    Row,
    ShardCtx,
    VocabColumn,
    find_mapping,
    te_aliases,
)


class DictReader:
    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.t = tensors

    def shape(self, name):
        return list(self.t[name].shape)

    def read(self, name, dim=None, start=None, stop=None):
        x = self.t[name]
        if dim is None:
            return x.clone()
        return x.narrow(dim, start, stop - start).clone()


def ctx(rank, size, **kw):
    base = dict(vocab_size=10, vocab_padded=16, num_heads=8, num_kv_heads=4, head_dim=3)
    base.update(kw)
    return ShardCtx(tp_rank=rank, tp_size=size, **base)


def roundtrip(m, tensors, idx, size, **kw):
    r = DictReader(tensors)
    shards = [m.load(r, idx, ctx(i, size, **kw)) for i in range(size)]
    full = torch.cat(shards, dim=m.split_dim) if m.split_dim is not None else shards[0]
    out = dict(m.to_hf(full, idx, ctx(0, size, **kw)))
    shapes = dict(m.hf_shapes(list(full.shape), idx, ctx(0, size, **kw)))
    return shards, out, shapes


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_qkv_weight_and_bias_roundtrip_and_layout(tp):
    g = torch.Generator().manual_seed(0)
    t = {"q": torch.randn(24, 5, generator=g), "k": torch.randn(12, 5, generator=g),
         "v": torch.randn(12, 5, generator=g), "qb": torch.randn(24, generator=g),
         "kb": torch.randn(12, generator=g), "vb": torch.randn(12, generator=g)}
    for names in (("q", "k", "v"), ("qb", "kb", "vb")):
        m = QKV("x", *names)
        shards, out, shapes = roundtrip(m, t, {}, tp)
        for n in names:
            assert torch.equal(out[n], t[n])
            assert shapes[n] == list(t[n].shape)
    # Layout: group 0 on rank 0 is [q heads 0-1, k head 0, v head 0]
    m = QKV("x", "q", "k", "v")
    s0 = m.load(DictReader(t), {}, ctx(0, tp))
    assert torch.equal(s0[:6], t["q"][:6])
    assert torch.equal(s0[6:9], t["k"][:3])
    assert torch.equal(s0[9:12], t["v"][:3])


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_gated_column_row_roundtrip(tp):
    g = torch.Generator().manual_seed(1)
    t = {"gate": torch.randn(8, 6, generator=g), "up": torch.randn(8, 6, generator=g),
         "down": torch.randn(6, 8, generator=g), "col": torch.randn(8, 3, generator=g)}
    m = GatedMLP("fc1", "gate", "up")
    shards, out, _ = roundtrip(m, t, {}, tp)
    assert torch.equal(out["gate"], t["gate"]) and torch.equal(out["up"], t["up"])
    # rank r holds [gate_r; up_r]
    per = 8 // tp
    assert torch.equal(shards[-1][:per], t["gate"][-per:])
    _, out, _ = roundtrip(Row("fc2", "down"), t, {}, tp)
    assert torch.equal(out["down"], t["down"])
    _, out, _ = roundtrip(Column("c", "col"), t, {}, tp)
    assert torch.equal(out["col"], t["col"])
    _, out, _ = roundtrip(Replicated("n", "col"), t, {}, tp)
    assert torch.equal(out["col"], t["col"])


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_vocab_padding_is_zero_and_trimmed(tp):
    emb = torch.randn(10, 4)
    shards, out, shapes = roundtrip(VocabColumn("e", "emb"), {"emb": emb}, {}, tp)
    full = torch.cat(shards)
    assert full.shape == (16, 4)
    assert torch.equal(full[:10], emb) and not full[10:].any()
    assert torch.equal(out["emb"], emb) and shapes["emb"] == [10, 4]


def test_templates_and_te_aliases():
    table = te_aliases([
        Replicated("decoder.layers.{L}.input_layernorm.weight",
                   "model.layers.{L}.input_layernorm.weight"),
        Row("decoder.layers.{L}.mlp.experts.local_experts.{E}.linear_fc2.weight",
            "model.layers.{L}.mlp.experts.{E}.down_proj.weight", expert=True),
        Replicated("vision_model.tower.{*}", "visual.{*}"),
    ])
    m, idx = find_mapping(table, "decoder.layers.7.self_attention.linear_qkv.layer_norm_weight")
    assert m.hf_names(idx) == ["model.layers.7.input_layernorm.weight"]
    m, idx = find_mapping(table, "decoder.layers.1.mlp.experts.linear_fc2.weight5")
    assert m.hf_names(idx) == ["model.layers.1.mlp.experts.5.down_proj.weight"] and m.expert
    m, idx = find_mapping(table, "vision_model.tower.blocks.0.attn.qkv.bias")
    assert m.hf_names(idx) == ["visual.blocks.0.attn.qkv.bias"]
    with pytest.raises(KeyError, match="no weight mapping"):
        find_mapping(table, "decoder.layers.0.unknown.weight")
