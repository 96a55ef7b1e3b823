"""Megatron-Core's optimizer bookkeeping with fewer Python calls: the same values, bit for bit.

Why: on the bench model (``bench/train_overhead.py``, 61 parameters) the optimizer step made
~1,000 of the CPU mode's ``__torch_function__`` calls and ~60 Python-level ``torch.norm`` calls
per step, around loops that only read gradients, take views and copy. Three changes, each
leaving every value as it was:

* The grad norm without Apex or TE (``clip_grads.l2_norm_impl`` is Megatron's
  ``local_multi_tensor_l2_norm``): Megatron takes ``torch.norm`` of each gradient in Python, packs
  the norms with ``torch.tensor`` and takes their norm. :func:`foreach_l2_norm` takes the
  per-gradient norms with one ``torch._foreach_norm`` (on CPU the same ``linalg_vector_norm``
  kernel per tensor), stacks them and takes their norm: the same kernels on the same values, so
  the same float (tests/unit/test_lean_optimizer.py compares with ``torch.equal`` on random
  lists, NaN included).
* ``to_local_if_dtensor`` as ``clip_grads`` calls it (twice per gradient): a plain tensor is
  returned at once instead of through a ``torch.no_grad()`` block; anything else (a DTensor)
  goes to Megatron's function.
* Loops that need nothing the CPU mode rewrites (:func:`mvlm.runtime.cpu.outside_cpu_mode`):
  the distributed optimizer's gradient and parameter copies, the gradient zeroing and the list of
  gradients for the norm run with the mode off. They create no tensor on a device, call no
  ``.cuda()`` and compare no ``Tensor.type()``; with no CPU mode installed (a GPU run) the wrapper
  calls through.

Installed by :func:`install` from :func:`mvlm.train.optim.wrap_ddp`, once per process.
"""
from __future__ import annotations

import functools
from typing import Any

import torch

from mvlm.runtime.cpu import outside_cpu_mode

_INSTALLED = False
ORIGINALS: dict[str, Any] = {}  # what install replaced (tests run the unpatched path with them)


def foreach_l2_norm(chunk_size: int, noop_flag: Any, tensor_lists: list, per_tensor: bool,
                    *args: Any) -> tuple[torch.Tensor, None]:
    """Megatron's ``local_multi_tensor_l2_norm`` (the L2 norm of ``tensor_lists[0]`` viewed as one
    vector, a one-element fp32 tensor) with the per-tensor norms in one foreach call."""
    tensors = tensor_lists[0]
    if per_tensor or not tensors:
        return ORIGINALS["l2_norm"](chunk_size, noop_flag, tensor_lists, per_tensor, *args)
    norms = torch._foreach_norm(tensors)
    return torch.linalg.vector_norm(torch.stack(norms)).reshape(1).float(), None


def _plain_first(to_local: Any) -> Any:
    @functools.wraps(to_local)
    def to_local_if_dtensor(tensor: Any) -> Any:
        if type(tensor) is torch.Tensor:
            return tensor
        return to_local(tensor)
    return to_local_if_dtensor


def install() -> None:
    """Patch the grad-norm function, ``clip_grads``' ``to_local_if_dtensor`` and wrap the pure
    optimizer loops (once per process)."""
    global _INSTALLED
    if _INSTALLED:
        return
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer
    from megatron.core.utils import local_multi_tensor_l2_norm

    ORIGINALS.update(l2_norm=clip_grads.l2_norm_impl, to_local=clip_grads.to_local_if_dtensor,
                     zero_helper=optimizer._zero_grad_group_helper)
    if clip_grads.l2_norm_impl is local_multi_tensor_l2_norm:  # not Apex's / TE's kernel
        clip_grads.l2_norm_impl = foreach_l2_norm
    clip_grads.to_local_if_dtensor = _plain_first(ORIGINALS["to_local"])
    zero = outside_cpu_mode(ORIGINALS["zero_helper"])
    for module in (optimizer, distrib_optimizer):
        if getattr(module, "_zero_grad_group_helper", None) is ORIGINALS["zero_helper"]:
            module._zero_grad_group_helper = zero
    dopt = distrib_optimizer.DistributedOptimizer
    for name in ("_copy_model_grads_to_main_grads", "_copy_main_params_to_model_params"):
        ORIGINALS[name] = getattr(dopt, name)
        setattr(dopt, name, outside_cpu_mode(ORIGINALS[name]))
    ORIGINALS["grads_for_norm"] = optimizer.MegatronOptimizer.get_main_grads_for_grad_norm
    optimizer.MegatronOptimizer.get_main_grads_for_grad_norm = outside_cpu_mode(
        ORIGINALS["grads_for_norm"])
    _INSTALLED = True
