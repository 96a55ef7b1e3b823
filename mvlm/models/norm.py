"""RMSNorm with Hugging Face's exact arithmetic, usable under sequence parallelism.

Megatron-Core's ``WrappedTorchNorm`` (its fallback when neither apex nor TE is present) refuses
``sequence_parallel=True``, and ``torch.nn.RMSNorm`` rounds differently from HF's Qwen/Llama norm
(HF normalises in fp32 and multiplies the weight after casting back). Matching HF bit-for-bit in
fp32 and within bf16 rounding otherwise is what makes the logits checks tight.
"""
from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(
            torch.ones(hidden_size, dtype=config.params_dtype,
                       device="cpu" if config.use_cpu_initialization else None)
        )
        # Sequence-parallel norms see a slice of the tokens on each TP rank, so their weight
        # grads are partial sums that Megatron's DDP all-reduces over TP when this flag is set.
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)
