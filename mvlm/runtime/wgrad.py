"""Megatron-Core linear layers on CPU: weight gradients written straight into DDP's ``main_grad``.

Why: without Apex/TE there is no gradient-accumulation fusion, so Megatron-Core's linear backward
returns a fresh ``grad_output^T @ input`` per weight, autograd hands it to the parameter, and
Megatron DDP's backward hook adds it into the fp32 ``main_grad`` view of the contiguous gradient
buffer (``param.main_grad.add_(param.grad)``): one more pass over every weight gradient and one
freshly allocated gradient tensor per weight and micro-batch. On CPU with fp32 gradients this
module lets the GEMM write its result into ``main_grad`` itself:

* the first write of a step (the buffer was zeroed by ``zero_grad_buffer`` and nothing was added
  since) is ``torch.mm(grad_output^T, input, out=main_grad)``: the same GEMM call as before with
  another output address, so the buffer holds exactly what ``0 + grad`` held (except that a
  ``-0.0`` product stays ``-0.0`` where ``0 + -0.0`` gave ``+0.0``: equal values);
* every later write of the step (the next micro-batches of gradient accumulation, a weight used
  twice) computes the product as before and adds it, ``main_grad.add_(grad)``: the same two
  operations Megatron ran, so accumulation over micro-batches is bit-identical too;
* the layer returns no weight gradient, so autograd allocates and accumulates nothing for it;
* a non-contiguous ``grad_output`` (the output layer's, from the transposed logits) is made
  contiguous once; Megatron's backward copied it twice (for the input gradient's matmul and
  for the weight gradient).

What counts as "written since the zeroing": the linear path itself and every run of DDP's
backward hook (another use of the weight outside a Megatron linear, e.g. a tied embedding)
clear the parameter's ``fresh`` mark; ``zero_grad_buffer`` sets it.

Since the first write of a marked weight overwrites its ``main_grad``, the buffer's zeroing
skips those ranges (:func:`mark_ddp` gives each gradient buffer a ``reset`` that zeroes only
the rest: on the bench model every parameter is marked, and the 0.7 ms memset of its 6.7M
elements per step is gone; the 0.4M whose gradients come through DDP's hook -- the embedding,
the norms -- are zeroed right before the hook adds, as below). Such a range
is ``dirty`` (it holds the last step's gradient) until something writes it: the GEMM's ``out=``
write cleans it; DDP's hook (which adds) zeroes it first; and before the gradient reduction
(``finish_grad_sync`` / ``start_grad_sync``, the first thing ``finalize_model_grads`` does) every
range still dirty -- a weight this step did not use -- is zeroed, so what the reduction, the
scaling, the norm and the optimizer read is what a full zeroing gave. Only parameters that
:func:`mark_ddp` accepted take this path: fp32 CPU ``main_grad`` of the weight's shape, in a
DDP chunk that does not overlap its gradient reduction with backward (overlap counts the
per-parameter hooks that this path no longer triggers). Everything else -- sequence parallelism,
deferred weight-gradient computation, Megatron's own fusion, a frozen weight -- runs Megatron's
backward unchanged. Installed by :func:`install` before the first DDP wrap
(:func:`mvlm.train.optim.wrap_ddp`), which then calls :func:`mark_ddp` on each chunk.
"""
from __future__ import annotations

import functools
from typing import Any

import torch

_INSTALLED = False
ORIGINALS: dict[str, Any] = {}  # what install replaced (tests run the unpatched path with them)
DIRECT = "_mvlm_wgrad_into_main_grad"  # parameter attribute: may take this path
FRESH = "_mvlm_main_grad_fresh"  # parameter attribute: main_grad zeroed, nothing added yet
DIRTY = "_mvlm_main_grad_dirty"  # parameter attribute: the zeroing skipped main_grad (stale)


def write_weight_grad(weight: torch.Tensor, grad_output: torch.Tensor,
                      total_input: torch.Tensor) -> None:
    """``weight.main_grad += grad_output^T @ total_input`` (2-D operands), as Megatron's linear
    backward + DDP hook compute it, with the product written in place when the buffer is fresh."""
    main = weight.main_grad
    if getattr(weight, FRESH, False):
        torch.mm(grad_output.t(), total_input, out=main)
        setattr(weight, FRESH, False)
        setattr(weight, DIRTY, False)
    else:
        main.add_(grad_output.t().matmul(total_input))


def _direct(ctx: Any, weight: torch.Tensor) -> bool:
    return (getattr(weight, DIRECT, False) and ctx.grad_output_buffer is None
            and not ctx.sequence_parallel and not ctx.gradient_accumulation_fusion)


def _make_linear_function(base: type) -> type:
    """A subclass of Megatron's ``LinearWithGradAccumulationAndAsyncCommunication`` whose backward
    writes the weight gradient into ``main_grad`` for marked weights (forward inherited)."""

    original_backward = base.backward

    class CpuMainGradLinear(base):  # type: ignore[misc, valid-type]
        @staticmethod
        def backward(ctx, grad_output):
            input, weight = ctx.saved_tensors
            if not _direct(ctx, weight):
                return original_backward(ctx, grad_output)  # wrapped in custom_bwd itself
            if getattr(ctx, "_fwd_used_autocast", False):  # custom_bwd's context, only if used
                with torch.autocast(device_type="cuda", dtype=ctx._dtype):
                    return _direct_backward(ctx, grad_output, input, weight)
            return _direct_backward(ctx, grad_output, input, weight)

    CpuMainGradLinear.__name__ = CpuMainGradLinear.__qualname__ = "CpuMainGradLinear"
    return CpuMainGradLinear


def _direct_backward(ctx: Any, grad_output: torch.Tensor, input: torch.Tensor,
                     weight: torch.Tensor) -> tuple:
    """The backward of a marked weight: input gradient, weight gradient into ``main_grad``."""
    from megatron.core.tensor_parallel import layers

    # once, not twice: Megatron's matmul and its wgrad preparation each copied a
    # non-contiguous grad_output (the logits' transposed gradient) for themselves
    grad_output = grad_output.contiguous()
    grad_input = grad_output.matmul(weight)
    handle = None
    if ctx.allreduce_dgrad:  # TP: the input gradient's all-reduce runs meanwhile
        handle = torch.distributed.all_reduce(grad_input, group=ctx.tp_group,
                                              async_op=True)
    grad_output, total_input = layers.prepare_input_tensors_for_wgrad_compute(
        grad_output, input)
    write_weight_grad(weight, grad_output, total_input)
    grad_bias = grad_output.sum(dim=0) if ctx.use_bias else None
    if handle is not None:
        handle.wait()
    return grad_input, None, grad_bias, None, None, None, None, None, None


def _fresh_after_zeroing(zero_grad_buffer: Any) -> Any:
    @functools.wraps(zero_grad_buffer)
    def wrapper(self: Any) -> None:
        zero_grad_buffer(self)
        for p in getattr(self, "_mvlm_direct_params", ()):
            setattr(p, FRESH, True)
    return wrapper


def _hook_marks_written(make_hook: Any) -> Any:
    @functools.wraps(make_hook)
    def wrapper(self: Any, param: torch.nn.Parameter) -> Any:
        hook = make_hook(self, param)

        def marked(*args: Any) -> Any:
            if param.grad is not None:
                clean(param)  # the hook adds into main_grad
                setattr(param, FRESH, False)
            return hook(*args)
        return marked
    return wrapper


def clean(param: torch.nn.Parameter) -> None:
    """Zero ``param.main_grad`` if the buffer's zeroing skipped it and nothing wrote it since."""
    if getattr(param, DIRTY, False):
        param.main_grad.zero_()
        setattr(param, DIRTY, False)


def _clean_before(sync: Any) -> Any:
    """DDP's gradient reduction, after zeroing the skipped ranges no weight gradient wrote."""
    @functools.wraps(sync)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        for p in getattr(self, "_mvlm_direct_params", ()):
            clean(p)
        return sync(self, *args, **kwargs)
    return wrapper


class PartialReset:
    """A gradient buffer's ``reset`` that zeroes everything but the marked weights' ranges
    (one foreach call over the gaps) and marks those weights fresh and dirty."""

    def __init__(self, gaps: list[torch.Tensor], params: list[torch.nn.Parameter]) -> None:
        self.gaps, self.params = gaps, params
        self.calls = 0

    def __call__(self) -> None:
        if self.gaps:
            torch._foreach_zero_(self.gaps)
        for p in self.params:
            setattr(p, FRESH, True)
            setattr(p, DIRTY, True)
        self.calls += 1


def partial_reset(grad_data: torch.Tensor | None,
                  direct: list[torch.nn.Parameter]) -> PartialReset | None:
    """The :class:`PartialReset` of one buffer's ``grad_data`` (1-D) for the marked weights whose
    ``main_grad`` lies in it, or None (no such weight, another layout, overlapping views)."""
    if grad_data is None or grad_data.dim() != 1 or not grad_data.is_contiguous():
        return None
    store, base, n = grad_data.untyped_storage().data_ptr(), grad_data.storage_offset(), \
        grad_data.numel()
    spans = []
    for p in direct:
        m = p.main_grad
        if m.untyped_storage().data_ptr() != store or not m.is_contiguous():
            continue
        a = m.storage_offset() - base
        if a < 0 or a + m.numel() > n:
            continue
        spans.append((a, a + m.numel(), p))
    if not spans:
        return None
    spans.sort(key=lambda s: s[0])
    gaps, pos = [], 0
    for a, b, _ in spans:
        if a < pos:
            return None
        if a > pos:
            gaps.append(grad_data[pos:a])
        pos = b
    if pos < n:
        gaps.append(grad_data[pos:])
    return PartialReset(gaps, [p for _, _, p in spans])


def install() -> None:
    """Swap Megatron-Core's linear autograd function and wrap DDP's zeroing and hook factory
    (once per process; unmarked parameters see no change)."""
    global _INSTALLED
    if _INSTALLED:
        return
    from megatron.core.distributed import DistributedDataParallel as DDP
    from megatron.core.tensor_parallel import layers

    ORIGINALS.update(linear=layers.LinearWithGradAccumulationAndAsyncCommunication,
                     zero_grad_buffer=DDP.zero_grad_buffer,
                     make_hook=DDP._make_backward_post_hook,
                     finish_grad_sync=DDP.finish_grad_sync, start_grad_sync=DDP.start_grad_sync)
    layers.LinearWithGradAccumulationAndAsyncCommunication = _make_linear_function(
        ORIGINALS["linear"])
    DDP.zero_grad_buffer = _fresh_after_zeroing(ORIGINALS["zero_grad_buffer"])
    DDP._make_backward_post_hook = _hook_marks_written(ORIGINALS["make_hook"])
    DDP.finish_grad_sync = _clean_before(ORIGINALS["finish_grad_sync"])
    DDP.start_grad_sync = _clean_before(ORIGINALS["start_grad_sync"])
    _INSTALLED = True


def mark_ddp(ddp: Any) -> int:
    """Mark the parameters of one Megatron DDP chunk that may take the direct path; returns how
    many. None when the chunk overlaps its gradient reduction, or off CPU / fp32.

    A weight is left on Megatron's own backward when its dtype is not its ``main_grad``'s (bf16
    weights with fp32 gradient buffers: the GEMM cannot write across dtypes, and the product must
    be rounded as Megatron rounds it) or when a gradient hook is registered on it (the hook must
    see the weight's gradient; this path hands autograd none)."""
    if not _INSTALLED or ddp.ddp_config.overlap_grad_reduce:
        return 0
    marked = []
    for p in ddp.module.parameters():
        main = getattr(p, "main_grad", None)
        if (p.requires_grad and main is not None and main.device.type == "cpu"
                and main.dtype == torch.float32 and p.dtype == main.dtype
                and main.shape == p.shape and main.is_contiguous()
                and not getattr(p, "_backward_hooks", None)):
            setattr(p, DIRECT, True)
            marked.append(p)
    ddp._mvlm_direct_params = marked
    for buffer in list(getattr(ddp, "buffers", ())) + list(
            getattr(ddp, "expert_parallel_buffers", ())):
        reset = partial_reset(getattr(buffer, "grad_data", None), marked)
        if reset is not None:
            buffer.reset = reset  # the instance's: zero_grad_buffer calls buffer.reset()
    return len(marked)
