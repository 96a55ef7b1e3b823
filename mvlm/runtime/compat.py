"""Fixes for Megatron-Core release bugs, each applied only when the bug is present.

Not a CPU adaptation (those live in ``cpu.py``): these bite on GPU boxes without Transformer
Engine too, such as the reference GPU image. Each fix checks for the exact defect first so it is a
no-op on releases that do not have it. Module-level fixes are installed by
:func:`apply_compat_fixes`, which :func:`mvlm.runtime.startup.startup` calls; the per-object ones
at the end of this file are called by the code that creates the object.
"""
from __future__ import annotations

import signal
from collections.abc import Iterable
from typing import Any

_DONE = False


def apply_compat_fixes() -> None:
    global _DONE
    if _DONE:
        return
    from megatron.core.transformer.moe import moe_utils

    # megatron-core 0.16.1 imports te_general_gemm inside a try-block and references it
    # unconditionally in the router's gating linear; without TE that is a NameError. The
    # intended behaviour (plain matmul) is what the code does when the name is None.
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    _fix_reshardable_optimizer_step()
    _fix_checkpoint_without_output()
    _DONE = True


def _fix_checkpoint_without_output() -> None:
    """megatron-core 0.16.1 without TE: ``CheckpointWithoutOutput`` (selective recompute of
    'layernorm') sets ``self.fp8 = fp8 is not None`` -- True for its default ``fp8=False`` -- and
    then calls Transformer Engine's ``FP8GlobalStateManager``, ``activation_recompute_forward`` and
    ``fp8_autocast``, which were never imported: NameError. Give the module the answers TE gives
    with fp8 off (not enabled, no recipe, no-op contexts): exactly the non-fp8 path.
    [recompute, issue 9]"""
    import contextlib

    from megatron.core.tensor_parallel import random as mrandom

    if getattr(mrandom, "HAVE_TE", True) or hasattr(mrandom, "FP8GlobalStateManager"):
        return

    class _NoFP8:
        @staticmethod
        def is_fp8_enabled() -> bool:
            return False

        @staticmethod
        def get_fp8_recipe() -> None:
            return None

    mrandom.FP8GlobalStateManager = _NoFP8
    mrandom.fp8_autocast = lambda *_, **__: contextlib.nullcontext()
    mrandom.activation_recompute_forward = lambda *_, **__: contextlib.nullcontext()


def _fix_reshardable_optimizer_step() -> None:
    """megatron-core 0.16.1 without Apex/TE: loading a ``fully_reshardable`` distributed-optimizer
    checkpoint raises ``KeyError: 'step'``. The loader skips torch Adam's per-param ``step`` in
    the saved tensors (it restores ``step`` from the param groups just before), then copies every
    key of the live state -- ``step`` included -- from the saved tensors. Fix: copy only the keys
    that were saved; ``step`` keeps the value the loader already set."""
    import inspect

    from megatron.core.optimizer import distrib_optimizer as do

    cls = do.DistributedOptimizer
    orig = cls._set_main_param_and_optimizer_states
    if getattr(orig, "_mvlm_fixed", False):
        return
    src = inspect.getsource(orig)
    if "for key in dst_tensors:" not in src:  # fixed upstream (or rewritten): leave it alone
        return

    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        if "step" not in tensors and \
                not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            state = self.optimizer.state[main_param]
            if "step" in state:
                tensors = dict(tensors, step=state["step"])  # a no-op copy onto itself
        return orig(self, model_param, tensors)

    _set_main_param_and_optimizer_states._mvlm_fixed = True
    cls._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states


# --------------------------------------------------------------------------------------------
# Per-object fixes. These defects live in objects (a built model, a loaded optimizer, a lazily
# started helper process), not in module state, so they cannot be patched once at start-up; the
# code that creates the object calls the fix. Each is a no-op where the defect is absent.
# --------------------------------------------------------------------------------------------
def mark_tp_weights(model: Any) -> None:
    """megatron-core 0.16.1 sets ``tensor_model_parallel``/``partition_dim`` on the weights of its
    parallel layers only inside their initialisers; with ``perform_initialization=False`` (weights
    loaded from a checkpoint) they are missing, and the optimizer's grad norm then counts every
    TP-split weight on TP rank 0 only (a too-small norm and wrong clipping under TP). Set them
    where missing. [called by mvlm.models.vlm.build_model]"""
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
        set_tensor_model_parallel_attributes,
    )

    for mod in model.modules():
        if isinstance(mod, (ColumnParallelLinear, VocabParallelEmbedding)):
            dim = 0
        elif isinstance(mod, RowParallelLinear):
            dim = 1
        else:
            continue
        w = getattr(mod, "weight", None)
        if w is not None and not hasattr(w, "tensor_model_parallel"):
            set_tensor_model_parallel_attributes(w, True, dim, 1)


def prime_optimizer_state(optimizer: Any) -> None:
    """Give a never-stepped distributed optimizer its Adam state before loading into it.

    Without Apex/TE, Megatron-Core's DistributedOptimizer.state_dict() reads the ``step`` of
    existing states, so loading into a fresh optimizer needs states to exist first. Megatron's own
    helper takes one zero-gradient step; it runs at lr 0 here so no parameter moves even for a
    moment (the loaded state replaces everything afterwards anyway). Optimizers that already hold
    state, or have no such helper, are left alone. [called by mvlm.train.checkpoint]"""
    for o in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(o, "optimizer", None)
        init = getattr(o, "_init_optimizer_states_with_dummy_values", None)
        if inner is None or init is None or any(len(s) for s in inner.state.values()):
            continue
        lrs = [g["lr"] for g in inner.param_groups]
        for g in inner.param_groups:
            g["lr"] = 0.0
        init()
        for g, lr in zip(inner.param_groups, lrs, strict=True):
            g["lr"] = lr


def unshare_adam_steps(optimizer: Any) -> None:
    """megatron-core 0.16.1 without Apex/TE restores torch Adam's per-parameter ``step`` as ONE
    tensor shared by every parameter's state; torch Adam increments it in place per parameter,
    so after one step the bias correction would use step+N_params. Give each state its own
    (a copy of an unshared step is the same value). [called by mvlm.train.checkpoint]"""
    import torch

    for o in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(o, "optimizer", None)
        if inner is None:
            continue
        for st in inner.state.values():
            if torch.is_tensor(st.get("step")):
                st["step"] = st["step"].clone()


def shield_checkpoint_writer(signals: Iterable[signal.Signals]) -> None:
    """Start Megatron-Core's torch_dist writer helper with ``signals`` ignored.

    dist_checkpointing's filesystem writer keeps one *spawned* multiprocessing Manager per rank
    (``filesystem_async._get_write_results_queue``), created at the first save, in the rank's
    process group. torchrun stops ranks with ``killpg`` and Slurm signals whole process trees,
    so SIGUSR1/SIGTERM would reach that helper too; with default dispositions it dies and the
    very save the signal asked for fails (BrokenPipeError). Started here with SIG_IGN (which
    survives exec), it ignores them. Only when Megatron-Core is already imported, and only for a
    release that has this lazily started helper and has not started it yet.
    [called by mvlm.train.signals.PreemptionHandler.install]"""
    import sys

    if "megatron.core" not in sys.modules:
        return
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
    except Exception:  # noqa: BLE001 - a Megatron-Core without this writer needs nothing
        return
    if getattr(fa, "_results_queue", True) is not None or \
            not hasattr(fa, "_get_write_results_queue"):
        return
    prev = {sig: signal.signal(sig, signal.SIG_IGN) for sig in signals}
    try:
        fa._get_write_results_queue()
    finally:
        for sig, handler in prev.items():
            signal.signal(sig, handler)
