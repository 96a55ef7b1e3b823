"""torchrun worker: SDPACoreAttention with CP = world size vs the CP=1 computation (gloo, CPU).

Every rank builds the same full q/k/v and upstream grad, computes the CP=1 reference locally,
then runs the CP module on its load-balanced slice. The output and the q/k/v grads of the slice
must equal the matching slice of the reference: max|diff| / max(1, max|reference|) <= 1e-6.
Outputs come out bit-identical; K/V grads are sums over every rank's queries, so CP changes the
fp32 summation order and they differ by ~1 ulp of their magnitude (|dv| up to ~5 here), which is why
the bound is relative to max(1, |reference|) rather than absolute. Checked twice: with the
CP group from Megatron's parallel_state and with plain groups passed via pg_collection; plus a
THD case whose samples are split one by one (Transformer Engine's THD + CP layout).
Exit status 0 = all equal; 1 = mismatch (the numbers are printed either way).
"""
from __future__ import annotations

import itertools
import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from mvlm.models.attention import SDPACoreAttention
from mvlm.runtime.cp import cp_packed_indices, split_for_cp

TOL = 1e-6
HEADS, GROUPS, HEAD_DIM = 4, 2, 8


def _config(cp: int) -> TransformerConfig:
    return TransformerConfig(
        num_layers=1,
        hidden_size=HEADS * HEAD_DIM,
        num_attention_heads=HEADS,
        num_query_groups=GROUPS,
        kv_channels=HEAD_DIM,
        context_parallel_size=cp,
        attention_dropout=0.0,  # the default is 0.1: outputs would be random
    )


def _case(
    name: str,
    attn_cp: SDPACoreAttention,
    attn_ref: SDPACoreAttention,
    s: int,
    b: int,
    packed: PackedSeqParams | None,
    mask_type: AttnMaskType,
) -> float:
    cp, rank = dist.get_world_size(attn_cp.cp_group), dist.get_rank(attn_cp.cp_group)
    gen = torch.Generator().manual_seed(1234)
    q = torch.randn(s, b, HEADS, HEAD_DIM, generator=gen)
    k = torch.randn(s, b, GROUPS, HEAD_DIM, generator=gen)
    v = torch.randn(s, b, GROUPS, HEAD_DIM, generator=gen)
    g = torch.randn(s, b, HEADS * HEAD_DIM, generator=gen)

    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = attn_ref(*full, None, attn_mask_type=mask_type, packed_seq_params=packed)
    ref_grads = torch.autograd.grad((ref * g).sum(), full)

    local = [split_for_cp(t, 0, cp, rank).requires_grad_() for t in (q, k, v)]
    out = attn_cp(*local, None, attn_mask_type=mask_type, packed_seq_params=packed)
    grads = torch.autograd.grad((out * split_for_cp(g, 0, cp, rank)).sum(), local)

    pairs = [(out, ref), *zip(grads, ref_grads)]
    diffs = [(a - split_for_cp(r, 0, cp, rank)).abs().max().item() for a, r in pairs]
    scales = [max(1.0, split_for_cp(r, 0, cp, rank).abs().max().item()) for _, r in pairs]
    worst = max(d / m for d, m in zip(diffs, scales))
    print(
        f"[cp={cp} rank={rank}] {name}: max|diff| out={diffs[0]:.2e} dq={diffs[1]:.2e} "
        f"dk={diffs[2]:.2e} dv={diffs[3]:.2e} (max|dv|={scales[3]:.1f}); scaled {worst:.2e}",
        flush=True,
    )
    return worst


def _thd_case(attn_cp: SDPACoreAttention, attn_ref: SDPACoreAttention, cp: int) -> float:
    """THD (b squeezed) + CP: every sample split 2*CP-ways on its own, as TE lays it out."""
    rank = dist.get_rank(attn_cp.cp_group)
    m = 2 * cp
    cu = torch.tensor([0, 3 * m, 4 * m, 7 * m], dtype=torch.int32)  # padded sample lengths
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             cu_seqlens_q_padded=cu, cu_seqlens_kv_padded=cu,
                             max_seqlen_q=3 * m, max_seqlen_kv=3 * m)
    s = int(cu[-1])
    gen = torch.Generator().manual_seed(99)
    q = torch.randn(s, HEADS, HEAD_DIM, generator=gen)
    k = torch.randn(s, GROUPS, HEAD_DIM, generator=gen)
    v = torch.randn(s, GROUPS, HEAD_DIM, generator=gen)
    g = torch.randn(s, 1, HEADS * HEAD_DIM, generator=gen)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = attn_ref(*full, None, packed_seq_params=params)
    ref_grads = torch.autograd.grad((ref * g).sum(), full)
    idx = cp_packed_indices(cu, cp, rank, s)
    local = [t[idx].clone().requires_grad_() for t in (q, k, v)]
    out = attn_cp(*local, None, packed_seq_params=params)
    grads = torch.autograd.grad((out * g[idx]).sum(), local)
    pairs = [(out, ref), *zip(grads, ref_grads)]
    diffs = [(a - r[idx]).abs().max().item() for a, r in pairs]
    worst = max(d / max(1.0, r[idx].abs().max().item()) for d, (_, r) in zip(diffs, pairs))
    print(f"[cp={cp} rank={rank}] mpu thd per-sample split: max|diff| "
          + " ".join(f"{n}={d:.2e}" for n, d in zip(("out", "dq", "dk", "dv"), diffs))
          + f"; scaled {worst:.2e}", flush=True)
    return worst


def _packed(cu: list[int]) -> PackedSeqParams:
    t = torch.tensor(cu, dtype=torch.int32)
    mx = max(b - a for a, b in itertools.pairwise(cu))
    return PackedSeqParams(
        qkv_format="sbhd", cu_seqlens_q=t, cu_seqlens_kv=t, max_seqlen_q=mx, max_seqlen_kv=mx
    )


def main() -> int:
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    parallel_state.initialize_model_parallel(context_parallel_size=world)

    ref = SDPACoreAttention(_config(1), 1, AttnMaskType.causal, "self")
    via_mpu = SDPACoreAttention(_config(world), 1, AttnMaskType.causal, "self")
    assert via_mpu.cp_size == world

    pgs = ProcessGroupCollection()
    # A TP group of one rank per process: every rank must create every group, in order.
    tp_groups = [dist.new_group([r], backend="gloo") for r in range(world)]
    pgs.tp = tp_groups[dist.get_rank()]
    pgs.cp = dist.new_group(list(range(world)), backend="gloo")
    via_pgs = SDPACoreAttention(_config(world), 1, AttnMaskType.causal, "self", pg_collection=pgs)
    assert via_pgs.cp_group is pgs.cp

    s = 8 * world * 2  # divisible by 2*CP
    # Three samples and tail padding; boundaries fall inside CP chunks on purpose.
    cu = [0, 5, s // 2 + 1, s - 3]
    worst = 0.0
    for tag, attn in (("mpu", via_mpu), ("pg_collection", via_pgs)):
        worst = max(worst, _case(f"{tag} plain causal b=2", attn, ref, s, 2, None,
                                 AttnMaskType.causal))
        worst = max(worst, _case(f"{tag} packed causal", attn, ref, s, 1, _packed(cu),
                                 AttnMaskType.causal))
    worst = max(worst, _case("mpu packed no_mask", via_mpu, ref, s, 1, _packed(cu),
                             AttnMaskType.no_mask))
    worst = max(worst, _case("mpu plain no_mask", via_mpu, ref, s, 2, None,
                             AttnMaskType.no_mask))

    worst = max(worst, _thd_case(via_mpu, ref, world))

    flags = torch.tensor([worst])
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    ok = flags.item() <= TOL
    if dist.get_rank() == 0:
        print(f"CP={world}: worst scaled diff over ranks {flags.item():.2e} "
              f"({'OK' if ok else 'MISMATCH'}, tol {TOL})", flush=True)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
