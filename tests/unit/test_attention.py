"""SDPACoreAttention vs a naive softmax(QK^T*scale)V reference, fp32 on CPU (tolerance 1e-6)."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from mvlm.models.attention import SDPACoreAttention
from mvlm.runtime.cp import cp_chunk_indices, cp_packed_indices, split_for_cp

TOL = 1e-6
HEADS, GROUPS, HEAD_DIM = 4, 2, 8


def _config(heads: int = HEADS, groups: int = GROUPS, dropout: float = 0.0) -> TransformerConfig:
    return TransformerConfig(
        num_layers=1,
        hidden_size=heads * HEAD_DIM,
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=HEAD_DIM,
        attention_dropout=dropout,
    )


def _module(mask_type: AttnMaskType, **cfg: object) -> SDPACoreAttention:
    return SDPACoreAttention(_config(**cfg), 1, mask_type, "self")


def _qkv(s: int, b: int, heads: int = HEADS, groups: int = GROUPS, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(s, b, heads, HEAD_DIM, generator=g, requires_grad=True)
    k = torch.randn(s, b, groups, HEAD_DIM, generator=g, requires_grad=True)
    v = torch.randn(s, b, groups, HEAD_DIM, generator=g, requires_grad=True)
    return q, k, v


def naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None):
    """softmax(QK^T/sqrt(d))V in sbhd with GQA by repeat_interleave; rows with no key -> 0."""
    rep = q.size(2) // k.size(2)
    k = k.repeat_interleave(rep, dim=2)
    v = v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("qbhd,kbhd->bhqk", q, k) / math.sqrt(q.size(-1))
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
        empty = ~allowed.any(-1, keepdim=True)
        scores = scores.masked_fill(empty, 0.0)
    probs = torch.softmax(scores, dim=-1)
    if allowed is not None:
        probs = probs.masked_fill(empty, 0.0)
    out = torch.einsum("bhqk,kbhd->qbhd", probs, v)
    return out.reshape(out.size(0), out.size(1), -1)


def _compare(out, ref, inputs) -> float:
    """Max error of the output and the q/k/v grads against the naive reference run in fp64.

    The reference runs in float64 so the number measures only our fp32 error (two fp32
    computations differ from each other by up to twice that). Each error is scaled by
    max(1, max|reference|): GQA kv grads sum over heads and reach |g| ~ 5, where 1e-6 absolute
    is ~2 ulp.
    """
    assert out.shape == ref.shape
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    grads = torch.autograd.grad((out * g).sum(), inputs)
    ref_grads = torch.autograd.grad((ref * g.to(ref.dtype)).sum(), inputs)
    assert all(torch.isfinite(x).all() for x in grads)
    pairs = [(out, ref), *zip(grads, ref_grads)]
    return max(
        (a.double() - b.double()).abs().max().item() / max(1.0, b.abs().max().item())
        for a, b in pairs
    )


def naive64(q, k, v, allowed):
    """The naive reference in float64, differentiable w.r.t. the fp32 q, k, v."""
    return naive(q.double(), k.double(), v.double(), allowed)


def _causal(s: int) -> torch.Tensor:
    return torch.ones(s, s, dtype=torch.bool).tril()[None, None]


@pytest.mark.parametrize("heads,groups", [(4, 4), (4, 2), (4, 1)])
def test_causal_matches_naive(heads: int, groups: int) -> None:
    q, k, v = _qkv(16, 2, heads, groups)
    attn = _module(AttnMaskType.causal, heads=heads, groups=groups)
    out = attn(q, k, v, None)
    assert out.shape == (16, 2, heads * HEAD_DIM)
    diff = _compare(out, naive64(q, k, v, _causal(16)), (q, k, v))
    print(f"causal heads={heads} groups={groups}: max diff {diff:.2e}")
    assert diff <= TOL


def test_no_mask_matches_naive() -> None:
    q, k, v = _qkv(12, 2)
    out = _module(AttnMaskType.no_mask)(q, k, v, None)
    assert _compare(out, naive64(q, k, v, None), (q, k, v)) <= TOL


def _packed_params(cu: list[int]) -> PackedSeqParams:
    cu_t = torch.tensor(cu, dtype=torch.int32)
    mx = max(b - a for a, b in itertools.pairwise(cu))
    return PackedSeqParams(
        qkv_format="sbhd", cu_seqlens_q=cu_t, cu_seqlens_kv=cu_t, max_seqlen_q=mx, max_seqlen_kv=mx
    )


def _block_causal(cu: list[int], s: int) -> torch.Tensor:
    seg = torch.zeros(s, dtype=torch.long)
    for i, start in enumerate(cu[1:]):
        seg[start:] = i + 1  # tail past cu[-1] becomes its own segment
    return ((seg[:, None] == seg[None, :]) & torch.ones(s, s, dtype=torch.bool).tril())[None, None]


def test_packed_three_segments_and_tail_padding() -> None:
    cu, s = [0, 5, 12, 20], 24  # positions 20..23 are tail padding
    q, k, v = _qkv(s, 1)
    params = _packed_params(cu)
    attn = _module(AttnMaskType.causal)
    out = attn(q, k, v, None, packed_seq_params=params)
    diff = _compare(out, naive64(q, k, v, _block_causal(cu, s)), (q, k, v))
    print(f"packed 3 segments + tail: max diff {diff:.2e}")
    assert diff <= TOL

    # No leak across samples: changing sample 0 leaves samples 1, 2 and the tail untouched.
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[:5] += 3.0
    v2[:5] -= 2.0
    out2 = attn(q, k2, v2, None, packed_seq_params=params)
    assert torch.equal(out2[5:], out[5:])


def test_thd_call_shape() -> None:
    """Megatron squeezes b for qkv_format='thd'; the output must reshape to [t, 1, h]."""
    cu, s = [0, 7, 16], 16
    q, k, v = _qkv(s, 1)
    params = _packed_params(cu)
    params.qkv_format = "thd"
    out = _module(AttnMaskType.causal)(q[:, 0], k[:, 0], v[:, 0], None, packed_seq_params=params)
    assert _compare(out, naive64(q, k, v, _block_causal(cu, s)), (q, k, v)) <= TOL


def test_padding_mask() -> None:
    s, b = 10, 2
    q, k, v = _qkv(s, b)
    lengths = torch.tensor([10, 6])
    key_pad = torch.arange(s)[None, :] >= lengths[:, None]  # True = masked out
    mask = key_pad[:, None, None, :].expand(b, 1, s, s).clone()
    mask[1, 0, 8:, :] = True  # two query rows that see nothing: must be 0, not NaN
    out = _module(AttnMaskType.padding)(q, k, v, mask)
    assert out[8:, 1].abs().max().item() == 0.0
    diff = _compare(out, naive64(q, k, v, ~mask), (q, k, v))
    print(f"padding: max diff {diff:.2e}")
    assert diff <= TOL

    out_pc = _module(AttnMaskType.padding_causal)(q, k, v, key_pad[:, None, None, :])
    ref_pc = naive64(q, k, v, ~key_pad[:, None, None, :] & _causal(s))
    assert _compare(out_pc, ref_pc, (q, k, v)) <= TOL


def test_runtime_mask_type_override() -> None:
    """SelfAttention passes attn_mask_type per call; it wins over the constructor's."""
    q, k, v = _qkv(8, 1)
    out = _module(AttnMaskType.causal)(q, k, v, None, attn_mask_type=AttnMaskType.no_mask)
    assert _compare(out, naive64(q, k, v, None), (q, k, v)) <= TOL


def test_dropout_only_in_training() -> None:
    q, k, v = _qkv(8, 1)
    attn = _module(AttnMaskType.causal, dropout=0.5)
    attn.eval()
    assert _compare(attn(q, k, v, None), naive64(q, k, v, _causal(8)), (q, k, v)) <= TOL
    attn.train()
    assert not torch.allclose(attn(q, k, v, None), naive(q, k, v, _causal(8)))


def test_head_count_mismatch_is_an_error() -> None:
    q, k, v = _qkv(8, 1, heads=4, groups=4)
    with pytest.raises(ValueError, match="num_query_groups"):
        _module(AttnMaskType.causal, heads=4, groups=2)(q, k, v, None)


def test_cp_chunk_layout() -> None:
    assert cp_chunk_indices(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert cp_chunk_indices(8, 2, 1).tolist() == [2, 3, 4, 5]
    for cp in (1, 2, 4):
        held = torch.cat([cp_chunk_indices(16, cp, r) for r in range(cp)])
        assert sorted(held.tolist()) == list(range(16))
    x = torch.arange(2 * 16 * 3).view(2, 16, 3)
    for r in range(4):
        assert torch.equal(split_for_cp(x, 1, 4, r), x[:, cp_chunk_indices(16, 4, r)])
    with pytest.raises(ValueError, match="divisible"):
        cp_chunk_indices(10, 2, 0)
    # THD: each sample (here lengths 4 and 8) split 2*CP ways on its own.
    cu = torch.tensor([0, 4, 12], dtype=torch.int32)
    assert cp_packed_indices(cu, 2, 0, 12).tolist() == [0, 3, 4, 5, 10, 11]
    assert cp_packed_indices(cu, 2, 1, 12).tolist() == [1, 2, 6, 7, 8, 9]


def test_packed_params_carry_segment_parent_on_sbhd_and_refuse_it_on_thd():
    """Shared-prefix pair rows need the tree mask only SDPACoreAttention's sbhd path applies: the
    parents ride the sbhd params, and a THD row with parents is an error, never a silent drop
    (which would cut every rejected answer off its prompt)."""
    import pytest
    import torch

    from mvlm.train.steps import packed_params

    batch = {"cu_seqlens": torch.tensor([0, 3, 6]),
             "input_ids": torch.zeros(1, 8, dtype=torch.long),
             "segment_parent": torch.tensor([-1, 0])}
    assert packed_params(batch, "sbhd").segment_parent.tolist() == [-1, 0]
    with pytest.raises(RuntimeError, match="THD layout"):
        packed_params(batch, "thd")
    del batch["segment_parent"]
    assert packed_params(batch, "thd").qkv_format == "thd"
