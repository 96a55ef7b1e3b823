"""lean_ops.RotateHalf (the full-width, non-interleaved RoPE without the rotated copy and the
backward concatenation) against Megatron-Core's own ``_apply_rotary_pos_emb_bshd``: the same
output and input gradient, bit for bit, on the query/key views a fused QKV split hands RoPE.

The whole-step check (three training steps, Megatron's RoPE swapped back in, losses, main grads
and parameters ``torch.equal``) is tests/unit/test_runtime_wgrad.py."""
from __future__ import annotations

import pytest
import torch

from mvlm.runtime import lean_ops


def _megatron_rope():
    from megatron.core.models.common.embeddings import rope_utils

    lean_ops.install()
    return lean_ops.ORIGINALS["rope"], rope_utils._apply_rotary_pos_emb_bshd


def _qkv_part(part: str, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A query or key as Megatron's fused QKV split hands it to RoPE, and per-row RoPE angles
    ([s, b, 1, d], as M-RoPE position ids give them): the query a contiguous [s, b, heads, d]
    copy, the key a strided view of the projection output (gaps where the query and value
    parts lie), both leaves of the same graph as the projection output."""
    g = torch.Generator().manual_seed(seed)
    s, b, groups, per, d = 7, 3, 2, 2, 16
    qkv = torch.randn(s, b, groups, (per + 2) * d, generator=g).to(dtype)
    qkv[0, 0, 0, :4] = 0.0  # zeros: products of either sign meet here
    qkv[1, 0, 0, 3] = -0.0
    qkv[0, 0, 0, per * d:per * d + 4] = 0.0
    qkv.requires_grad_(True)
    if part == "query":
        t = qkv[..., : per * d].unflatten(-1, (per, d)).flatten(2, 3)
    else:
        t = qkv[..., per * d:(per + 1) * d]
    freqs = torch.randn(s, b, 1, d // 2, generator=g).repeat(1, 1, 1, 2)
    return t, freqs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mscale", [1.0, 0.7])
@pytest.mark.parametrize("part", ["query", "key"])
def test_rotate_half_equals_megatron(dtype, mscale, part):
    original, adapted = _megatron_rope()
    calls = []
    real_apply = lean_ops.RotateHalf.apply
    lean_ops.RotateHalf.apply = lambda *a: calls.append(1) or real_apply(*a)
    try:
        outs, grads = [], []
        for fn in (original, adapted):
            q, freqs = _qkv_part(part, dtype, seed=5)
            assert q.is_contiguous() == (part == "query")
            out = fn(q, freqs, rotary_interleaved=False, mscale=mscale)
            grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(dtype)
            grad[0, 0, 0, :3] = -0.0
            (gq,) = torch.autograd.grad(out, q, grad)
            outs.append(out.detach())
            grads.append(gq)
    finally:
        lean_ops.RotateHalf.apply = real_apply
    assert calls == [1]  # the adapted side took the new path, the original did not
    assert outs[0].dtype == outs[1].dtype == dtype
    assert outs[0].is_contiguous() and outs[1].is_contiguous()
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(grads[0], grads[1])


def test_interleaved_column_major_and_trainable_angles_keep_megatron_expression():
    """Interleaved rotation and a transposed (column-major) input are not taken (the layout of
    the result would differ from Megatron's), nor angles that need a gradient (RotateHalf gives
    none to ``cos``/``sin``)."""
    _, adapted = _megatron_rope()
    calls = []
    real_apply = lean_ops.RotateHalf.apply
    lean_ops.RotateHalf.apply = lambda *a: calls.append(1) or real_apply(*a)
    try:
        q, freqs = _qkv_part("key", torch.float32, seed=1)
        adapted(q, freqs, rotary_interleaved=True)
        t = torch.randn(16, 3, 4, 7).permute(3, 1, 2, 0)  # [7, 3, 4, 16], strides growing
        adapted(t, freqs[:, :1], rotary_interleaved=False)
        trainable = freqs.clone().requires_grad_(True)
        q, _ = _qkv_part("key", torch.float32, seed=2)
        out = adapted(q, trainable, rotary_interleaved=False)
        out.sum().backward()
        assert trainable.grad is not None and trainable.grad.abs().sum() > 0
    finally:
        lean_ops.RotateHalf.apply = real_apply
    assert calls == []


def test_row_major_guard():
    x = torch.zeros(4, 3, 8)
    assert lean_ops._row_major(x)
    assert lean_ops._row_major(torch.zeros(4, 3, 16)[..., :8])  # gaps, order kept
    assert not lean_ops._row_major(x.transpose(0, 2))


def test_broadcast_check_agrees_with_torch():
    """lean_ops' cheap check (RotateHalf's guard) says what torch.broadcast_shapes says."""
    import itertools

    from mvlm.runtime.lean_ops import _broadcasts_to

    shapes = [(), (1,), (4,), (3, 1), (1, 4), (3, 4), (2, 3, 4), (2, 1, 4), (5, 3, 4),
              (1, 1, 1, 4), (2, 3, 1), (8, 2, 6, 64), (8, 1, 1, 64)]
    for small, shape in itertools.product(shapes, shapes):
        try:
            expected = torch.broadcast_shapes(shape, small) == torch.Size(shape)
        except RuntimeError:
            expected = False
        assert _broadcasts_to(torch.Size(small), torch.Size(shape)) == expected, (small, shape)
