"""RMSNorm and LayerNorm with Hugging Face's exact arithmetic, usable under sequence parallelism.

Megatron-Core's ``WrappedTorchNorm`` (its fallback when neither apex nor TE is present) refuses
``sequence_parallel=True``, and ``torch.nn.RMSNorm`` rounds differently from HF's Qwen/Llama norm
(HF normalises in fp32 and multiplies the weight after casting back). Matching HF bit-for-bit in
fp32 and within bf16 rounding otherwise is what makes the logits checks tight.

``config.layernorm_zero_centered_gamma`` stores the scale as ``w`` and applies ``1 + w``: Gemma's
RMSNorm (computed in fp32, then cast, as HF's ``GemmaRMSNorm``) and Nemotron's ``LayerNorm1P``.
"""
from __future__ import annotations

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


class RMSNorm(nn.Module):
    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.zero_centered = bool(getattr(config, "layernorm_zero_centered_gamma", False))
        self.weight = _norm_param(config, hidden_size, 0.0 if self.zero_centered else 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
