"""router_padding_mask (mvlm.models.vlm): which positions the MoE router must skip.

The numerical proof (padded and packed MoE layouts equal one rank unpadded) is
tests/dist/test_train_parity_more.py; here the mask itself, no process group: padded rows take
the key-padding mask, packed rows the tail at or beyond cu_seqlens[-1], both cut for CP the way
the hidden states are (mvlm.runtime.cp.split_for_cp)."""
from __future__ import annotations

from types import SimpleNamespace

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from mvlm.models.vlm import router_padding_mask
from mvlm.runtime.cp import split_for_cp

NO_SP = SimpleNamespace(sequence_parallel=False)


def _packed(cu: list[int]) -> PackedSeqParams:
    t = torch.tensor(cu, dtype=torch.int32)
    return PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=t, cu_seqlens_kv=t)


def test_padded_rows_use_the_attention_mask():
    keep = torch.tensor([[True, True, False], [True, False, False]])
    assert torch.equal(router_padding_mask(keep, NO_SP, 1, 0), ~keep)


def test_packed_tail_is_padding():
    pos = torch.zeros(3, 1, 12, dtype=torch.long)
    pad = router_padding_mask(None, NO_SP, 1, 0, _packed([0, 4, 9]), pos)
    assert pad.tolist() == [[False] * 9 + [True] * 3]
    assert router_padding_mask(None, NO_SP, 1, 0, _packed([0, 4, 12]), pos) is None
    assert router_padding_mask(None, NO_SP, 1, 0) is None


def test_packed_tail_split_for_cp():
    pos = torch.zeros(3, 1, 16, dtype=torch.long)
    full = torch.arange(16)[None] >= 11
    for r in range(2):
        pad = router_padding_mask(None, NO_SP, 2, r, _packed([0, 6, 11]), pos)
        assert torch.equal(pad, split_for_cp(full, 1, 2, r))
    # rank 0 holds chunks 0 and 3 (positions 0-3, 12-15), rank 1 chunks 1 and 2 (4-11)
    assert router_padding_mask(None, NO_SP, 2, 0, _packed([0, 6, 11]), pos)[0].sum() == 4
    assert router_padding_mask(None, NO_SP, 2, 1, _packed([0, 6, 11]), pos)[0].sum() == 1
