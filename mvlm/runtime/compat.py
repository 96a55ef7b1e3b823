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
    _DONE = True
