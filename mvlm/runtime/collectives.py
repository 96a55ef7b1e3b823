"""Megatron-Core DDP's gradient reduce-scatter and parameter all-gather, skipped on a group of one.

Why: with the distributed optimizer, every step Megatron-Core's bucket groups reduce-scatter the
whole gradient buffer and all-gather the whole parameter buffer over the data-parallel group,
also when that group has one rank (a one-GPU run, every TP/PP-only layout, the CPU benchmarks).
The result is then the input itself -- the local shard *is* the buffer -- but gloo clones the
buffer for it (measured on the 6.7M-parameter benchmark model: one 27 MB copy of ~35 ms per step,
``bench/train_overhead.py``). On a group of one the collective is the identity, so skipping it
changes no bit; on any larger group, and for asynchronous (overlapped) calls, whose handle the
caller waits on, the original function runs unchanged.

Installed by :func:`install`, once per process, before the first Megatron DDP wrap
(:func:`mvlm.train.optim.wrap_ddp`).
"""
from __future__ import annotations

import functools
from typing import Any

import torch

_INSTALLED = False


def _size_one(group: Any) -> bool:
    return group is not None and group.size() == 1


def skip_on_group_of_one(func: Any) -> Any:
    """``func(output, input, *, group, async_op)`` made a local copy (or nothing, when output and
    input are the same memory) for a synchronous call on a one-rank ``group``."""
    if getattr(func, "_mvlm_size_one", False):
        return func

    @functools.wraps(func)
    def wrapper(output: torch.Tensor, input: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        group = kwargs.get("group")
        if not kwargs.get("async_op", False) and not args and _size_one(group) \
                and output.shape == input.shape:
            if output.data_ptr() != input.data_ptr() or output.stride() != input.stride():
                output.copy_(input)
            return None
        return func(output, input, *args, **kwargs)

    wrapper._mvlm_size_one = True  # type: ignore[attr-defined]
    return wrapper


def install() -> None:
    """Wrap the two module-level collectives Megatron-Core's ``param_and_grad_buffer`` calls."""
    global _INSTALLED
    if _INSTALLED:
        return
    from megatron.core.distributed import param_and_grad_buffer as pgb

    pgb.dist_reduce_scatter_func = skip_on_group_of_one(pgb.dist_reduce_scatter_func)
    pgb.dist_all_gather_func = skip_on_group_of_one(pgb.dist_all_gather_func)
    _INSTALLED = True
