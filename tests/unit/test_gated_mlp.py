"""mvlm/runtime/gated_mlp.py: ``linear_fc1`` + SwiGLU as one node with gate and up apart.

The node against plain autograd on the same weight (``F.linear``, ``chunk``, ``silu``, ``*``, the
weight's ``.grad`` accumulated by autograd): output, input gradient and the weight gradient that
lands in ``main_grad`` are bit-identical, for the first write after zeroing and for a second
micro-batch added on top, at odd sizes and in Megatron's [s, b, h] layout. The whole-step
comparison with Megatron's own path is in test_runtime_wgrad.py. Then the guard: which
``linear_fc1`` layers take the node.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from mvlm.runtime import gated_mlp, wgrad


@pytest.fixture
def fc1(one_rank):
    """A Megatron ColumnParallelLinear [2 * 96, 64] on a one-rank group, its weight marked for
    wgrad's direct path with a zeroed fp32 main_grad, as mark_ddp leaves it."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear
    from megatron.core.transformer.transformer_config import TransformerConfig

    torch.manual_seed(0)
    cfg = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4,
                            use_cpu_initialization=True)
    layer = ColumnParallelLinear(64, 2 * 96, config=cfg, init_method=torch.nn.init.normal_,
                                 bias=False, gather_output=False, tp_group=dist.new_group([0]))
    w = layer.weight
    w.main_grad = torch.zeros_like(w)
    setattr(w, wgrad.DIRECT, True)
    setattr(w, wgrad.FRESH, True)
    return layer


def _reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    gate, up = torch.nn.functional.linear(x, w).chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


@pytest.mark.parametrize("shape", [(7, 64), (5, 3, 64)])
def test_node_is_autograd_bitwise(fc1, shape):
    w = fc1.weight
    ref_w = w.detach().clone().requires_grad_()
    for micro in range(2):  # fresh main_grad, then a second micro-batch added to it
        x = torch.randn(shape, generator=torch.Generator().manual_seed(micro))
        g = torch.randn(*shape[:-1], 96, generator=torch.Generator().manual_seed(10 + micro))
        xa = x.clone().requires_grad_()
        xb = x.clone().requires_grad_()
        assert gated_mlp.applies(fc1, xa)
        out = gated_mlp.Fc1SwiGLU.apply(xa, w)
        ref = _reference(xb, ref_w)
        assert torch.equal(out, ref)
        out.backward(g)
        ref.backward(g)
        assert torch.equal(xa.grad, xb.grad)
        assert w.grad is None  # the weight gradient went into main_grad, not to autograd
        assert torch.equal(w.main_grad, ref_w.grad)
        assert not getattr(w, wgrad.FRESH)


def test_which_layers_take_the_node(fc1):
    x = torch.randn(4, 64)
    assert gated_mlp.applies(fc1, x)
    assert not gated_mlp.applies(fc1, x.to(torch.bfloat16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not gated_mlp.applies(fc1, x)
    handle = fc1.register_forward_hook(lambda *a: None)  # e.g. a LoRA adapter's hook
    assert not gated_mlp.applies(fc1, x)
    handle.remove()
    assert gated_mlp.applies(fc1, x)
    fc1.bias = torch.nn.Parameter(torch.zeros(2 * 96))
    assert not gated_mlp.applies(fc1, x)
    fc1.bias = None
    fc1.sequence_parallel = True
    assert not gated_mlp.applies(fc1, x)
    fc1.sequence_parallel = False
    setattr(fc1.weight, wgrad.DIRECT, False)  # not marked by mark_ddp (overlap, bf16, hooks)
    assert not gated_mlp.applies(fc1, x)
    setattr(fc1.weight, wgrad.DIRECT, True)
    fc1.weight.requires_grad_(False)  # frozen
    assert not gated_mlp.applies(fc1, x)
    fc1.weight.requires_grad_(True)
    fc1.forward = lambda *a, **k: None  # an instance-level forward replaces Megatron's
    assert not gated_mlp.applies(fc1, x)
    del fc1.forward
    assert gated_mlp.applies(fc1, x)
    assert not gated_mlp.applies(torch.nn.Linear(64, 192, bias=False), x)
