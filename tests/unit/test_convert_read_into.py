"""Direct reads into parameters (``SafetensorsReader.read_into``, ``Mapping.load_into``) give
exactly what the copying path (``read`` / ``load``) gives, for every mapping kind and TP rank."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from mvlm.convert.hf_io import CheckpointError, SafetensorsReader
from mvlm.convert.mapping import (
    QKV,
    Column,
    GatedMLP,
    Replicated,
    Row,
    ShardCtx,
    ShardShapeError,
    VocabColumn,
)

H, HEADS, KV, D, FFN, VOCAB, PADDED = 8, 4, 2, 2, 12, 10, 12


@pytest.fixture
def reader(tmp_path):
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(torch.bfloat16)

    save_file({"q.w": r(HEADS * D, H), "k.w": r(KV * D, H), "v.w": r(KV * D, H),
               "q.b": r(HEADS * D), "k.b": r(KV * D), "v.b": r(KV * D),
               "gate": r(FFN, H), "up": r(FFN, H), "down": r(H, FFN), "emb": r(VOCAB, H),
               "norm": r(H), "conv": r(4, 6, 3), "empty": r(0, 3)},
              tmp_path / "model.safetensors")
    return SafetensorsReader(tmp_path)


def test_read_into_matches_slices(reader):
    full = reader.read("conv")
    for dim, lo, hi in ((None, None, None), (0, 1, 3), (1, 2, 5), (1, 0, 6), (0, 4, 4)):
        want = full if dim is None else full.narrow(dim, lo, hi - lo)
        assert torch.equal(reader.read("conv", dim, lo, hi), want)
        out = torch.empty(want.shape, dtype=torch.bfloat16)
        reader.read_into("conv", out, dim, lo, hi)
        assert torch.equal(out, want)
        out32 = torch.empty(want.shape, dtype=torch.float32)  # cast through one buffer
        reader.read_into("conv", out32, dim, lo, hi)
        assert torch.equal(out32, want.float())
    strided = torch.empty(6, 4, 3, dtype=torch.bfloat16).transpose(0, 1)  # not contiguous
    reader.read_into("conv", strided)
    assert torch.equal(strided, full)
    assert reader.read("empty").shape == (0, 3)
    with pytest.raises(ValueError, match="destination has shape"):
        reader.read_into("conv", torch.empty(4, 6, dtype=torch.bfloat16))
    with pytest.raises(CheckpointError, match="outside its shape"):
        reader.read("conv", 0, 2, 9)


@pytest.mark.parametrize("tp", [1, 2])
def test_load_into_matches_load(reader, tp):
    maps = [QKV("qkv.w", "q.w", "k.w", "v.w"), QKV("qkv.b", "q.b", "k.b", "v.b"),
            GatedMLP("fc1", "gate", "up"), Row("fc2", "down"), Column("col", "gate"),
            VocabColumn("emb", "emb"), Replicated("norm", "norm")]
    for rank in range(tp):
        ctx = ShardCtx(tp_rank=rank, tp_size=tp, vocab_size=VOCAB, vocab_padded=PADDED,
                       num_heads=HEADS, num_kv_heads=KV, head_dim=D)
        for m in maps:
            want = m.load(reader, {}, ctx)
            for dtype in (torch.bfloat16, torch.float32):
                out = torch.full(want.shape, 7.0, dtype=dtype)  # padding rows must be zeroed
                m.load_into(reader, {}, ctx, out)
                assert torch.equal(out, want.to(dtype)), (m, rank, dtype)


def test_load_into_shape_mismatch(reader):
    ctx = ShardCtx(tp_rank=0, tp_size=1, vocab_size=VOCAB, vocab_padded=PADDED,
                   num_heads=HEADS, num_kv_heads=KV, head_dim=D)
    for m, shape in ((Column("c", "gate"), (FFN + 1, H)), (Row("r", "down"), (H, FFN - 1)),
                     (Replicated("n", "norm"), (H + 1,)), (GatedMLP("f", "gate", "up"), (3, H)),
                     (QKV("qkv", "q.w", "k.w", "v.w"), (5, H))):
        with pytest.raises(ShardShapeError) as err:
            m.load_into(reader, {}, ctx, torch.empty(shape, dtype=torch.bfloat16))
        assert err.value.shape != shape
