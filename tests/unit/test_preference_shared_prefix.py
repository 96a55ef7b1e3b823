"""Shared-prefix pair rows ([prompt][chosen][rejected], the prompt and its image once per pair)
through the tiny Qwen2-VL: per-answer log-probs equal each sequence alone (fp32), the tree mask
is what makes them so, pixels listed once, step-0 DPO loss ln 2 exactly. The model needs
Megatron's parallel state, so the checks run in their own process
(``_preference_shared_prefix_worker.py``, which documents them)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_shared_prefix_pairs_equal_each_sequence_alone(tmp_path):
    p = subprocess.run([sys.executable, str(HERE / "_preference_shared_prefix_worker.py"),
                        str(tmp_path)], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    print(p.stdout)
    assert p.returncode == 0 and "OK" in p.stdout, p.stdout[-3000:] + p.stderr[-5000:]


def test_segment_parent_mask_is_the_pair_tree():
    """SDPACoreAttention with ``segment_parent`` on the packed params: pair 0 = prompt (0-4),
    chosen (5-8), rejected (9-13); pair 1 without a shared prompt (14-16, 17-19); tail pad 20-23.
    Equals an fp64 softmax(QK^T/sqrt(d))V under the tree mask written out here (bound 1e-6,
    fp32), and a rejected answer's output does not move when the chosen answer's keys do."""
    import math

    import torch
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from mvlm.models.attention import SDPACoreAttention

    cu, parent, s, heads, d = [0, 5, 9, 14, 17, 20], [-1, 0, 0, -1, -1], 24, 2, 8
    cfg = TransformerConfig(num_layers=1, hidden_size=heads * d, num_attention_heads=heads,
                            kv_channels=d, attention_dropout=0.0)
    attn = SDPACoreAttention(cfg, 1, AttnMaskType.causal, "self")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(s, 1, heads, d, generator=g) for _ in range(3))
    cu_t = torch.tensor(cu, dtype=torch.int32)
    params = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu_t, cu_seqlens_kv=cu_t,
                             max_seqlen_q=5, max_seqlen_kv=5)
    params.segment_parent = torch.tensor(parent)
    out = attn(q, k, v, None, packed_seq_params=params)

    seg = [next((i for i in range(len(cu) - 1) if cu[i] <= p < cu[i + 1]), -1) for p in range(s)]
    allowed = torch.zeros(s, s, dtype=torch.bool)
    for i in range(s):
        for j in range(i + 1):
            allowed[i, j] = seg[i] == seg[j] or (seg[i] >= 0 and parent[seg[i]] == seg[j] >= 0)
    q64, k64, v64 = q.double()[:, 0], k.double()[:, 0], v.double()[:, 0]
    scores = torch.einsum("qhd,khd->hqk", q64, k64) / math.sqrt(d)
    ref = torch.einsum("hqk,khd->qhd", scores.masked_fill(~allowed, -math.inf).softmax(-1), v64)
    diff = float((out[:, 0].double() - ref.reshape(s, -1)).abs().max())
    print(f"tree mask vs fp64 reference: max diff {diff:.2e}")
    assert diff <= 1e-6
    k2, v2 = k.clone(), v.clone()
    k2[5:9] += 3.0
    v2[5:9] -= 2.0
    out2 = attn(q, k2, v2, None, packed_seq_params=params)
    assert torch.equal(out2[9:14], out[9:14]) and torch.equal(out2[:5], out[:5])
    assert not torch.equal(out2[5:9], out[5:9])
