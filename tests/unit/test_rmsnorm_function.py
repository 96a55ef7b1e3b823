"""RMSNorm as one autograd node (mvlm/models/norm.py): the forward and every gradient are bitwise
those of the six-node expression it replaces (HF's RMSNorm), for the shapes the models give it
(token-major hidden states, per-head q/k-norm input, widths that are not a multiple of the
vector width), with the input or the weight frozen; other dtypes and autocast keep the
expression."""
from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch

from mvlm.models.norm import RMSNorm, RMSNormFunction


def _config(dtype: torch.dtype = torch.float32, zero_centered: bool = False) -> SimpleNamespace:
    return SimpleNamespace(params_dtype=dtype, use_cpu_initialization=True,
                           sequence_parallel=False, layernorm_zero_centered_gamma=zero_centered)


def _expression(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """HF's RMSNorm (Qwen2RMSNorm / LlamaRMSNorm) as autograd sees it."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.eps)
    return norm.weight * h.to(x.dtype)


def _run(fn, x0: torch.Tensor, weight: torch.nn.Parameter, grad: torch.Tensor, x_grad: bool):
    x = x0.clone().requires_grad_(x_grad)
    weight.grad = None
    y = fn(x)
    y.backward(grad)
    return y, x.grad, weight.grad


@pytest.mark.parametrize("shape,scale,x_grad,w_grad", [
    (s, c, xg, wg) for s, c, xg, wg in itertools.product(
        [(1, 7), (256, 4, 384), (16, 3, 5, 64), (2, 1, 130)], [1e-3, 1.0, 1e3],
        [True, False], [True, False]) if xg or wg])
def test_bitwise_equal_to_the_expression(shape, scale, x_grad, w_grad):
    torch.manual_seed(0)
    norm = RMSNorm(_config(), shape[-1])
    norm.weight.data = torch.randn(shape[-1]) * 0.2 + 1
    norm.weight.requires_grad_(w_grad)
    x0, grad = torch.randn(*shape) * scale, torch.randn(*shape)
    seen = []
    orig = RMSNormFunction.apply

    def spy(*a):
        seen.append(1)
        return orig(*a)

    RMSNormFunction.apply = spy
    try:
        got = _run(norm, x0, norm.weight, grad, x_grad)
    finally:
        RMSNormFunction.apply = orig
    want = _run(lambda x: _expression(norm, x), x0, norm.weight, grad, x_grad)
    assert seen, "the one-node path was not taken"
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b)
    node = got[0].grad_fn
    assert type(node).__name__ == "RMSNormFunctionBackward"


def test_zero_and_huge_rows():
    """An all-zero row (rsqrt of eps) and large values: still the expression's bits."""
    norm = RMSNorm(_config(), 24, eps=1e-6)
    x0 = torch.randn(5, 24)
    x0[1] = 0.0
    x0[3] *= 1e18
    g = torch.randn(5, 24)
    got = _run(norm, x0, norm.weight, g, True)
    want = _run(lambda x: _expression(norm, x), x0, norm.weight, g, True)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("case", ["bf16", "no_grad", "zero_centered", "autocast"])
def test_other_cases_keep_the_expression(case):
    dtype = torch.bfloat16 if case == "bf16" else torch.float32
    norm = RMSNorm(_config(dtype, zero_centered=case == "zero_centered"), 16)
    x = torch.randn(3, 16, dtype=dtype, requires_grad=True)
    if case == "no_grad":
        with torch.no_grad():
            y = norm(x)
        assert y.grad_fn is None
        assert torch.equal(y, _expression(norm, x).detach())
        return
    if case == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = norm(x)
    else:
        y = norm(x)
    assert type(y.grad_fn).__name__ != "RMSNormFunctionBackward"
