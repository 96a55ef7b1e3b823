"""Fixes for Megatron-Core release bugs, each applied only when the bug is present.

Not a CPU adaptation (those live in ``cpu.py``): these bite on GPU boxes without Transformer
Engine too, such as the reference GPU image. Each fix checks for the exact defect first so it is a
no-op on releases that do not have it.
"""
from __future__ import annotations

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
