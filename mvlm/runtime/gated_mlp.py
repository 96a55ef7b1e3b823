"""A gated MLP's ``linear_fc1`` and SwiGLU as one autograd node on CPU, with gate and up apart.

Why: ``linear_fc1`` of a SwiGLU MLP is one GEMM with a ``[gate; up]`` weight, so its output is
one ``[tokens, 2 * ffn]`` tensor and the gate and up halves are interleaved rows of it (each
row: ``ffn`` gate values, then ``ffn`` up values). Every elementwise pass of the activation then
reads or writes half-rows 4-8 KB apart: on the bench's shapes ``silu_backward`` took 2.5 ms per
layer where transformers' (separate ``gate_proj`` / ``up_proj``, contiguous halves) took about
1 ms, and the ``silu`` forward and the two products lost a little more.

:class:`Fc1SwiGLU` computes the two halves as two GEMMs into two contiguous tensors,
``x @ W[:ffn]^T`` and ``x @ W[ffn:]^T``, and runs ``silu(gate) * up`` on them. The backward is
what ``lean_ops.SwiGLU`` and ``wgrad``'s direct linear backward ran, in the same order and with
the same operands: the two half gradients written into one ``[tokens, 2 * ffn]`` tensor, the
input gradient as one GEMM with the whole weight, the weight gradient as one GEMM into
``main_grad`` (``wgrad.write_weight_grad``). Only the forward GEMM is split. A GEMM's output
column depends only on its own weight row and the input, and with the pinned torch's MKL the
split GEMMs give the same bits as the one GEMM's halves (checked on 96 shapes at 1 and 2
threads, and by ``tests/unit/test_runtime_wgrad.py``'s whole-step comparison with Megatron's
path, which must stay bit-identical).

Taken (:func:`applies`) only where the fused node computes exactly what Megatron's modules
would: ``linear_fc1`` a ``ColumnParallelLinear`` with Megatron's own forward (not LoRA's hooked
or TE's layers) without bias, hooks, output gather, sequence parallelism or a TP group of more
than one rank (no collective to run), its weight marked by :func:`mvlm.runtime.wgrad.mark_ddp`
(fp32 CPU ``main_grad``, gradient reduction after the backward, trainable), no autocast, fp32
CPU input. Everything else runs ``linear_fc1`` and ``lean_ops.SwiGLU`` as before.
"""
from __future__ import annotations

from typing import Any

import torch

from mvlm.runtime import wgrad


class Fc1SwiGLU(torch.autograd.Function):
    """``silu(x @ Wg^T) * (x @ Wu^T)`` for ``W = [Wg; Wu]``; the weight gradient goes into
    ``W.main_grad`` (the weight's autograd gradient is None, as on wgrad's direct path)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ffn = weight.shape[0] // 2
        x2 = x.reshape(-1, x.shape[-1])
        gate = torch.mm(x2, weight[:ffn].t())
        up = torch.mm(x2, weight[ffn:].t())
        act = torch.nn.functional.silu(gate)
        ctx.save_for_backward(x2, weight, gate, up, act)
        ctx.in_shape = x.shape
        return (act * up).view(*x.shape[:-1], ffn)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        x2, weight, gate, up, act = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        d_inter = torch.empty((g2.shape[0], 2 * g2.shape[1]), dtype=grad.dtype,
                              device=grad.device)
        d_gate, d_up = torch.chunk(d_inter, 2, dim=-1)
        # lean_ops.SwiGLU's backward: autograd's MulBackward0 and SiluBackward0 kernels
        torch.ops.aten.silu_backward.grad_input(g2 * up, gate, grad_input=d_gate)
        torch.mul(g2, act, out=d_up)
        # wgrad's direct linear backward: input gradient, weight gradient into main_grad
        grad_input = d_inter.matmul(weight)
        wgrad.write_weight_grad(weight, d_inter, x2)
        return grad_input.view(ctx.in_shape), None


def _no_hooks(module: torch.nn.Module) -> bool:
    from torch.nn.modules import module as nn_module

    return not (module._forward_hooks or module._forward_pre_hooks
                or nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks)


def applies(fc1: Any, x: torch.Tensor) -> bool:
    """Whether ``Fc1SwiGLU`` computes what ``fc1`` (a gated MLP's ``linear_fc1``) followed by the
    plain SwiGLU would: see the module docstring for each condition."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    cls = type(fc1)  # mvlm's spec subclasses it only to fix the bias argument
    if not (isinstance(fc1, ColumnParallelLinear) and "forward" not in vars(fc1)
            and cls.forward is ColumnParallelLinear.forward
            and cls._forward_impl is ColumnParallelLinear._forward_impl):
        return False
    weight = fc1.weight
    return (weight is not None and fc1.bias is None and not fc1.gather_output
            and not fc1.sequence_parallel and not fc1.gradient_accumulation_fusion
            and (fc1.tp_group is None or fc1.tp_group.size() == 1)
            and not getattr(fc1.config, "defer_embedding_wgrad_compute", False)
            and getattr(fc1.config, "_cpu_offloading_context", None) is None
            and weight.requires_grad and getattr(weight, wgrad.DIRECT, False)
            and weight.shape[0] % 2 == 0
            and x.dtype == weight.dtype == torch.float32 and x.device.type == "cpu"
            and not torch.is_autocast_enabled("cpu") and _no_hooks(fc1))
