"""The CPU TorchFunctionMode of mvlm/runtime/cpu.py: CUDA placements rewritten to CPU, whether
they come through a keyword or one of the functions rewritten whatever their arguments, and
every other call passed straight on (its fast path)."""
from __future__ import annotations

import pytest
import torch

from mvlm.runtime.cpu import _CudaToCpuMode

needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks CPU rewriting")


@needs_no_gpu
def test_cuda_placements_become_cpu():
    t = torch.arange(4.0)
    with _CudaToCpuMode():
        made = [torch.empty(2, device="cuda"), torch.zeros(2, device=0),
                torch.ones(2, device=torch.device("cuda", 0)), torch.empty(2, pin_memory=True),
                t.to("cuda"), t.to(device="cuda:0"), t.new_zeros(3, device="cuda")]
        assert t.cuda() is t and t.pin_memory() is t
        assert t.type() == "torch.cuda.FloatTensor"
        assert t.long().type() == "torch.cuda.LongTensor"
        assert t.type(torch.float64).dtype == torch.float64  # a conversion, not a name
    assert all(m.device.type == "cpu" for m in made)
    with pytest.raises((RuntimeError, AssertionError)):  # without the mode: a CUDA error
        torch.empty(2, device="cuda")


def test_calls_without_keywords_pass_unchanged():
    t = torch.arange(6.0)
    with _CudaToCpuMode():
        v, s, m = t.view(2, 3), torch.add(t, t), torch.matmul(t.view(2, 3), t.view(3, 2))
        k = torch.add(t, t, alpha=2)  # a keyword that is not a placement
    assert torch.equal(v, t.view(2, 3)) and torch.equal(s, 2 * t)
    assert torch.equal(m, t.view(2, 3) @ t.view(3, 2)) and torch.equal(k, 3 * t)


class _PlacesOnCuda(torch.autograd.Function):
    """A backward that allocates on CUDA, as Megatron-Core's MoE dispatcher does."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2 + torch.zeros(g.shape, device="cuda")


@needs_no_gpu
def test_backward_runs_inside_the_mode():
    x = torch.ones(3, requires_grad=True)
    with _CudaToCpuMode():
        _PlacesOnCuda.apply(x).sum().backward()  # Tensor.backward, keyword-less
        y = torch.ones(2, requires_grad=True)
        torch.autograd.backward([_PlacesOnCuda.apply(y * 3).sum()])
    assert torch.equal(x.grad, torch.full((3,), 2.0)) and torch.equal(y.grad, torch.full((2,), 6.0))
