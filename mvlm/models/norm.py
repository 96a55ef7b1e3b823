"""RMSNorm and LayerNorm with Hugging Face's exact arithmetic, usable under sequence parallelism.

Megatron-Core's ``WrappedTorchNorm`` (its fallback when neither apex nor TE is present) refuses
``sequence_parallel=True``, and ``torch.nn.RMSNorm`` rounds differently from HF's Qwen/Llama norm
(HF normalises in fp32 and multiplies the weight after casting back). Matching HF bit-for-bit in
fp32 and within bf16 rounding otherwise is what makes the logits checks tight.

``config.layernorm_zero_centered_gamma`` stores the scale as ``w`` and applies ``1 + w``: Gemma's
RMSNorm (computed in fp32, then cast, as HF's ``GemmaRMSNorm``) and Nemotron's ``LayerNorm1P``.

In fp32 training the RMSNorm runs as one autograd node (:class:`RMSNormFunction`) instead of six
(``pow``, ``mean``, ``add``, ``rsqrt`` and two ``mul``): the forward is the same expression, and
the backward evaluates the formulas autograd's nodes would (same operators, same operand order;
only ``a * b == b * a`` and ``a + b == b + a`` are used), so the norm's output and its input and
weight gradients are bitwise autograd's, with fewer full-size temporaries and no per-node
bookkeeping. One thing differs: autograd adds the norm's two contributions to its input's
gradient one at a time to whatever else flows into that tensor (the residual branch), the
function hands over their sum, so a layer input's gradient can differ in the last bit
(``(r + a) + b`` against ``r + (a + b)``).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn


def _norm_param(config: TransformerConfig, hidden_size: int, value: float) -> nn.Parameter:
    p = nn.Parameter(torch.full((hidden_size,), value, dtype=config.params_dtype,
                                device="cpu" if config.use_cpu_initialization else None))
    # Sequence-parallel norms see a slice of the tokens on each TP rank, so their weight
    # grads are partial sums that Megatron's DDP all-reduces over TP when this flag is set.
    p.sequence_parallel = config.sequence_parallel
    return p


class RMSNormFunction(torch.autograd.Function):
    """``weight * (x * rsqrt(mean(x ** 2, -1) + eps))`` for fp32 ``x`` and ``weight``, with the
    gradients autograd computes for that expression.

    Autograd's nodes, in order: ``MulBackward0`` (``weight * h``: ``g * weight`` for ``h``,
    ``g * h`` summed over the leading dims for ``weight``), ``MulBackward0`` (``h = x * r``:
    ``dh * r`` for ``x``, ``dh * x`` summed over the last dim for ``r``), ``RsqrtBackward0``
    (``-0.5 * dr * r ** 3``), ``AddBackward0``, ``MeanBackward1`` (broadcast, divided by the
    width), ``PowBackward0`` (``dm * (2 * x)``) and the sum of the two contributions to ``x``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        h = x * r
        ctx.save_for_backward(x, r, h, weight)
        return weight * h

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple:
        x, r, h, weight = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_w = grad_x = None
        if need_w:
            grad_w = (g * h).sum(tuple(range(g.dim() - 1)))  # autograd's sum_to over leading dims
        if need_x:
            dh = g * weight
            grad_x = dh * r
            dr = dh.mul_(x).sum(-1, keepdim=True)
            dm = (-0.5 * dr * r.pow(3)) / x.shape[-1]
            grad_x.add_(torch.mul(x, 2, out=dh).mul_(dm))  # dh's buffer is free again
        return grad_x, grad_w, None


def _one_node(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :class:`RMSNormFunction` applies: fp32 training without autocast (anything else
    runs the plain expression, whose casts and autocast rules it does not reproduce)."""
    return (x.dtype == torch.float32 and weight.dtype == torch.float32
            and torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
            and not torch.is_autocast_enabled(x.device.type))


class RMSNorm(nn.Module):
    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.zero_centered = bool(getattr(config, "layernorm_zero_centered_gamma", False))
        self.weight = _norm_param(config, hidden_size, 0.0 if self.zero_centered else 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.zero_centered and _one_node(x, self.weight):
            return RMSNormFunction.apply(x, self.weight, self.eps)
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.zero_centered:  # HF GemmaRMSNorm: scale in fp32, then cast
            return (h * (1.0 + self.weight.float())).to(dtype)
        return self.weight * h.to(dtype)


class LayerNorm(nn.Module):
    """``torch.nn.LayerNorm`` (weight and bias) as HF's families use it, with SP-aware params."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.hidden_size = hidden_size
        self.zero_centered = bool(getattr(config, "layernorm_zero_centered_gamma", False))
        self.weight = _norm_param(config, hidden_size, 0.0 if self.zero_centered else 1.0)
        self.bias = _norm_param(config, hidden_size, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight + 1 if self.zero_centered else self.weight
        return F.layer_norm(x, (self.hidden_size,), w, self.bias, self.eps)


def norm_class(config: TransformerConfig) -> type[nn.Module]:
    """The local-spec norm for ``config.normalization``."""
    return LayerNorm if config.normalization == "LayerNorm" else RMSNorm
