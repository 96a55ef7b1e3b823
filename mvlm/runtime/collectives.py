"""Collectives and tensor-parallel mappings on a group of one, skipped.

Why, for Megatron-Core DDP's gradient reduce-scatter and parameter all-gather: with the
distributed optimizer, every step Megatron-Core's bucket groups reduce-scatter the whole gradient
buffer and all-gather the whole parameter buffer over the data-parallel group,
also when that group has one rank (a one-GPU run, every TP/PP-only layout, the CPU benchmarks).
The result is then the input itself -- the local shard *is* the buffer -- but gloo clones the
buffer for it (measured on the 6.7M-parameter benchmark model: one 27 MB copy of ~35 ms per step,
``bench/train_overhead.py``). On a group of one the collective is the identity, so skipping it
changes no bit; on any larger group, and for asynchronous (overlapped) calls, whose handle the
caller waits on, the original function runs unchanged.

The same holds, per call and smaller, for three more things a one-rank group does every step:

* ``torch.distributed.all_reduce`` called synchronously on a group of one (Megatron-Core's
  vocabulary-parallel cross entropy reduces its max, its sum of exponentials and the target
  logits over the TP group: three calls per micro-batch; the grad norm, the loss statistics):
  for the reductions whose result on one rank is the input (sum, average, product, min, max,
  bitwise and/or/xor) the tensor is left as it is. ``PREMUL_SUM`` (it scales), asynchronous
  calls and larger groups run the original.
* ``torch.distributed.broadcast`` called synchronously on a group of one from this rank (the
  number of tokens Megatron-Core's ``finalize_model_grads`` shares along PP, the loss statistics
  :func:`mvlm.train.steps.reduce_stats` shares along PP: two per step at PP1, ~75 us each over
  gloo): the tensor already holds what the source sent. Any other source runs the original (its
  error), as do asynchronous calls and larger groups.
* The tensor-parallel region mappings of Megatron-Core's linear and embedding layers
  (``copy_to_tensor_model_parallel_region`` before each column-parallel linear,
  ``reduce_from_tensor_model_parallel_region`` after each row-parallel one and the embedding):
  on a TP group of one both are the identity forward and backward, and the input is returned
  without the ``autograd.Function`` around it (2 x 9 Python function applications per step of a
  4-layer model; the gradient is the same tensor either way).

Installed by :func:`install`, once per process, before the first Megatron DDP wrap
(:func:`mvlm.train.optim.wrap_ddp`).
"""
from __future__ import annotations

import functools
from typing import Any

import torch

_INSTALLED = False


def _size_one(group: Any) -> bool:
    # not a process group (None, torch's NON_GROUP_MEMBER sentinel): the original call decides
    size = getattr(group, "size", None)
    return size is not None and size() == 1


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


def _identity_ops() -> frozenset:
    r = torch.distributed.ReduceOp
    return frozenset((r.SUM, r.AVG, r.PRODUCT, r.MIN, r.MAX, r.BAND, r.BOR, r.BXOR))


def all_reduce_skipping_group_of_one(func: Any) -> Any:
    """``torch.distributed.all_reduce`` that leaves the tensor as it is for a synchronous call on
    a one-rank group (``group=None``: the default group) with a reduction whose one-rank result
    is its input."""
    if getattr(func, "_mvlm_size_one", False):
        return func
    identity = _identity_ops()
    sum_op = torch.distributed.ReduceOp.SUM

    @functools.wraps(func)
    def all_reduce(tensor: torch.Tensor, op: Any = sum_op, group: Any = None,
                   async_op: bool = False) -> Any:
        if not async_op and op in identity:
            g = group if group is not None else torch.distributed.group.WORLD
            if _size_one(g):
                return None
        return func(tensor, op=op, group=group, async_op=async_op)

    all_reduce._mvlm_size_one = True  # type: ignore[attr-defined]
    return all_reduce


def broadcast_skipping_group_of_one(func: Any) -> Any:
    """``torch.distributed.broadcast`` that leaves the tensor as it is for a synchronous call on
    a one-rank ``group`` (``None``: the default group) whose source is this rank (``src``, global)
    or the group's rank 0 (``group_src``)."""
    if getattr(func, "_mvlm_size_one", False):
        return func

    @functools.wraps(func)
    def broadcast(tensor: torch.Tensor, src: Any = None, group: Any = None,
                  async_op: bool = False, group_src: Any = None) -> Any:
        if not async_op:
            g = group if group is not None else torch.distributed.group.WORLD
            if _size_one(g) and ((group_src is None and src is not None
                                  and src == torch.distributed.get_rank())
                                 or (src is None and group_src == 0)):
                return None
        return func(tensor, src=src, group=group, async_op=async_op, group_src=group_src)

    broadcast._mvlm_size_one = True  # type: ignore[attr-defined]
    return broadcast


def identity_on_group_of_one(mapping: Any) -> Any:
    """A Megatron-Core TP-region mapping ``f(input_, group=None)`` that returns ``input_`` itself
    when the (explicitly passed) group has one rank; otherwise the mapping runs."""
    if getattr(mapping, "_mvlm_size_one", False):
        return mapping

    @functools.wraps(mapping)
    def wrapper(input_: torch.Tensor, group: Any = None) -> torch.Tensor:
        if _size_one(group):
            return input_
        return mapping(input_, group=group)

    wrapper._mvlm_size_one = True  # type: ignore[attr-defined]
    return wrapper


def install() -> None:
    """Wrap the two module-level collectives Megatron-Core's ``param_and_grad_buffer`` calls,
    ``torch.distributed.all_reduce`` and ``broadcast``, and the TP-region mappings of
    Megatron-Core's layers."""
    global _INSTALLED
    if _INSTALLED:
        return
    from megatron.core.distributed import param_and_grad_buffer as pgb
    from megatron.core.tensor_parallel import layers

    pgb.dist_reduce_scatter_func = skip_on_group_of_one(pgb.dist_reduce_scatter_func)
    pgb.dist_all_gather_func = skip_on_group_of_one(pgb.dist_all_gather_func)
    torch.distributed.all_reduce = all_reduce_skipping_group_of_one(torch.distributed.all_reduce)
    torch.distributed.broadcast = broadcast_skipping_group_of_one(torch.distributed.broadcast)
    for name in ("copy_to_tensor_model_parallel_region",
                 "reduce_from_tensor_model_parallel_region"):
        setattr(layers, name, identity_on_group_of_one(getattr(layers, name)))
    _INSTALLED = True
