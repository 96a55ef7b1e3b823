"""Causal self-attention on CPU as GEMMs over query blocks, with GQA's query heads grouped.

Why: torch's CPU flash-attention kernel (what ``F.scaled_dot_product_attention`` runs for fp32
CPU tensors) multiplies one head's small query tile by one key tile at a time. In the training
benchmark's profile (4 rows x 256 tokens, 6 query / 2 KV heads of 64, one thread) its forward +
backward took 18.6 ms per layer, 12 % of the step, at about 35 GFLOP/s where the step's large
GEMMs run at about 90.

Here the sequence is cut into blocks of :data:`BLOCK` query rows. For each block, the rows of
all query heads that share one KV head are stacked (``g * BLOCK`` rows, ``g`` = query heads per
KV head), so the block's scores for the whole group are ONE batched GEMM against the keys the
block can see (positions ``< hi``): keys above the causal diagonal are multiplied only inside
the diagonal ``BLOCK x BLOCK`` tile, which is masked. The softmax probabilities are kept for the
backward (four batched GEMMs per block: ``dV``, ``dP``, ``dQ``, ``dK``; nothing recomputed),
which is why :func:`applies` takes this kernel only while they are small next to the layer's
other saved activations (:data:`MAX_PROBS_PER_QUERY`); longer sequences keep SDPA's O(s)
memory. Small calls (:data:`MIN_WORK`) keep SDPA too: there the per-block Python work costs
more than the larger GEMMs save. Timing against SDPA: ``bench/attention_cpu.py`` in
docs/benchmarks.md.

Numerics: the same math as SDPA in another summation order (row maxima and sums over the
visible keys only, the scale applied inside the GEMM); in fp32 the error against an fp64
reference is of the same size as SDPA's (``tests/unit/test_causal_blocks.py`` asserts the
bound). A query row's result depends only on that row and its KV head's keys and values, so
dividing the heads (TP) gives the same bits as one rank.
"""
from __future__ import annotations

from typing import Any

import torch

BLOCK = 32
"""Query rows per block. ``bench/attention_cpu.py --block N`` (4 rows, 6 / 2 heads of 64, one
thread, forward + backward): 16, 32 and 64-row blocks took 0.772 / 0.773 / 0.828 of SDPA's time
at 256 tokens and 0.753 / 0.708 / 0.800 at 480."""

MAX_PROBS_PER_QUERY = 4.0
"""The kept probabilities hold ``(s + BLOCK) / 2`` values per query row and head against the
query's ``head_dim``: take this kernel while that ratio is at most 4 (up to 480 tokens at head
dim 64, 992 at 128), i.e. while the probabilities take at most 4x the query's memory, a fraction
of what the layer's MLP keeps for its backward."""


MIN_WORK = 2**24
"""Smallest ``b * h * s**2 * head_dim`` (the score GEMM's multiply-adds without the causal
saving) taken: below it the per-block Python work outweighs the larger GEMMs. Measured with
``bench/attention_cpu.py`` (one thread, forward + backward, blocks / SDPA time): 4 rows x 6 heads
of 64 at 64 / 96 / 128 / 256 tokens (6.3 M / 14 M / 25 M / 101 M) 1.11 / 0.93 / 0.80 / 0.76;
2 rows x 4 heads of 32 at 128 / 192 tokens (4.2 M / 9.4 M) 1.35 / 1.16."""


def applies(query: torch.Tensor, key: torch.Tensor, dropout_p: float) -> bool:
    """Whether :func:`attention` runs this call: sbhd fp32/fp64 CPU tensors outside CPU
    autocast, self-attention (``sq == sk``), no dropout, at least :data:`MIN_WORK` and the
    probabilities within :data:`MAX_PROBS_PER_QUERY` (see the module docstring)."""
    if query.device.type != "cpu" or key.device.type != "cpu":
        return False
    if query.dtype not in (torch.float32, torch.float64) or key.dtype != query.dtype:
        return False
    if dropout_p != 0.0 or query.size(0) != key.size(0) or torch.is_autocast_enabled("cpu"):
        return False
    s, b, h, d = query.shape
    return b * h * s * s * d >= MIN_WORK and (s + BLOCK) / (2 * d) <= MAX_PROBS_PER_QUERY


def key_padding(mask: torch.Tensor | None, b: int, s: int) -> tuple[bool, torch.Tensor | None]:
    """Whether a core-attention ``attention_mask`` (bool, True = masked out) can run here, and
    as what: ``(True, None)`` for no mask or one that masks nothing, ``(True, [b, s])`` for a
    key-padding mask ``[b or 1, 1, 1, s]`` (padded batches) whose first key is visible in every
    row, ``(False, None)`` otherwise. The first key matters: with it visible every causal query
    row sees at least one key, so no row's softmax is empty (SDPA's path outputs zeros there)."""
    if mask is None:
        return True, None
    if (mask.dtype != torch.bool or mask.device.type != "cpu" or mask.dim() != 4
            or tuple(mask.shape[1:]) != (1, 1, s) or mask.size(0) not in (1, b)):
        return False, None
    pad = mask[:, 0, 0, :]
    if not bool(pad.any()):
        return True, None
    if bool(pad[:, 0].any()):
        return False, None
    return True, pad.expand(b, s)


def _to_blocks(x: torch.Tensor, groups: int) -> torch.Tensor:
    """An sbhd ``[s, b, h, d]`` tensor as ``[nb, b * groups, g * BLOCK, d]`` (one copy): block
    ``j``'s rows of the ``g = h / groups`` query heads that share a KV head, stacked head by
    head, so each block is one contiguous batch of GEMM operands. Rows past ``s`` (the last
    block of a length that is not a multiple of BLOCK) are zeros."""
    s, b, h, d = x.shape
    g, nb, full = h // groups, -(-s // BLOCK), s // BLOCK
    blocks = (x.new_empty if nb == full else x.new_zeros)(nb, b, groups, g, BLOCK, d)
    dst = blocks.permute(0, 4, 1, 2, 3, 5)  # [nb, BLOCK, b, groups, g, d]
    src = x.view(s, b, groups, g, d)
    if full:
        dst[:full].copy_(src[:full * BLOCK].view(full, BLOCK, b, groups, g, d))
    if nb > full:
        dst[full, :s - full * BLOCK].copy_(src[full * BLOCK:])
    return blocks.view(nb, b * groups, g * BLOCK, d)


def _from_blocks(blocks: torch.Tensor, s: int, b: int) -> torch.Tensor:
    """Inverse of :func:`_to_blocks`: ``[nb, b * groups, g * BLOCK, d]`` back to sbhd."""
    nb, bg, gn, d = blocks.shape
    groups, g = bg // b, gn // BLOCK
    out = blocks.new_empty(s, b, groups * g, d)
    src = blocks.view(nb, b, groups, g, BLOCK, d).permute(0, 4, 1, 2, 3, 5)
    dst = out.view(s, b, groups, g, d)
    full = s // BLOCK
    if full:
        dst[:full * BLOCK].view(full, BLOCK, b, groups, g, d).copy_(src[:full])
    if nb > full:
        dst[full * BLOCK:].copy_(src[full, :s - full * BLOCK])
    return out


_DIAG: dict[tuple[int, int], torch.Tensor] = {}


def _diag_mask(cols: int) -> torch.Tensor:
    """``[BLOCK, cols]``, True above the diagonal: the masked part of a block's diagonal tile
    (``cols`` < BLOCK only for the last block of a ragged length)."""
    key = (BLOCK, cols)
    if key not in _DIAG:
        _DIAG[key] = torch.ones(BLOCK, cols, dtype=torch.bool).triu_(1)
    return _DIAG[key]


class BlockedCausalAttention(torch.autograd.Function):
    """``softmax(scale * Q K^T + causal mask) V`` on sbhd tensors, query heads ``h`` over KV
    heads ``hkv`` (query head ``i`` uses KV head ``i // (h / hkv)``, Megatron's order).
    Returns ``[s, b, h, d]``."""

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                scale: float, key_pad: torch.Tensor | None) -> torch.Tensor:
        s, b, h, d = query.shape
        hkv = key.size(2)
        k = key.permute(1, 2, 0, 3).reshape(b * hkv, s, d)
        v = value.permute(1, 2, 0, 3).reshape(b * hkv, s, d)
        q = _to_blocks(query, hkv)  # [nb, b*hkv, g*BLOCK, d]
        out = torch.empty_like(q)
        probs: list[torch.Tensor] = []
        for j in range(q.size(0)):
            lo, hi = j * BLOCK, min((j + 1) * BLOCK, s)  # keys [0, hi) are visible
            scores = torch.baddbmm(q.new_empty(()), q[j], k[:, :hi].transpose(1, 2),
                                   beta=0.0, alpha=scale)  # [b*hkv, g*BLOCK, hi]
            scores.view(b * hkv, h // hkv, BLOCK, hi)[..., lo:].masked_fill_(
                _diag_mask(hi - lo), float("-inf"))
            if key_pad is not None:
                scores.view(b, -1, hi).masked_fill_(key_pad[:, None, :hi], float("-inf"))
            p = torch.softmax(scores, dim=-1)
            torch.bmm(p, v[:, :hi], out=out[j])
            probs.append(p)
        ctx.save_for_backward(q, k, v, *probs)
        ctx.scale, ctx.shape = scale, (s, b, h, d)
        return _from_blocks(out, s, b)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        q, k, v, *probs = ctx.saved_tensors
        s, b, h, d = ctx.shape
        hkv = k.size(0) // b
        go = _to_blocks(grad, hkv)
        dq = torch.empty_like(q)
        dk: torch.Tensor | None = None
        dv: torch.Tensor | None = None
        # The last block sees every key: going backwards, its GEMMs create dK / dV whole and
        # each earlier block adds into a prefix (an accumulating GEMM into a strided prefix
        # view would run as one small GEMM per batch entry).
        for j in range(q.size(0) - 1, -1, -1):
            hi = min((j + 1) * BLOCK, s)
            p = probs[j]
            dv_j = torch.bmm(p.transpose(1, 2), go[j])
            dscores = torch._softmax_backward_data(
                torch.bmm(go[j], v[:, :hi].transpose(1, 2)), p, -1, p.dtype)
            torch.baddbmm(dq[j], dscores, k[:, :hi], beta=0.0, alpha=ctx.scale, out=dq[j])
            dk_j = torch.baddbmm(dq.new_empty(()), dscores.transpose(1, 2), q[j],
                                 beta=0.0, alpha=ctx.scale)
            if dk is None or dv is None:
                dk, dv = dk_j, dv_j
            else:
                dk[:, :hi].add_(dk_j)
                dv[:, :hi].add_(dv_j)
        assert dk is not None and dv is not None

        def to_sbhd(x: torch.Tensor) -> torch.Tensor:
            return x.view(b, hkv, s, d).permute(2, 0, 1, 3)

        return _from_blocks(dq, s, b), to_sbhd(dk), to_sbhd(dv), None, None


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
              key_pad: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of sbhd ``query [s, b, h, d]`` over ``key/value [s, b, hkv, d]``, keys
    where ``key_pad [b, s]`` is True masked out (see :func:`key_padding`); returns
    ``[s, b, h, d]`` (check :func:`applies` first)."""
    return BlockedCausalAttention.apply(query, key, value, scale, key_pad)
