"""glibc's allocator set up for a CPU training loop: freed step memory is kept, not re-faulted.

Why: a training step allocates and frees the same activations every step. With glibc's default
dynamic thresholds (the mmap threshold follows the largest freed mmapped chunk, the trim
threshold is twice it) the heap is shrunk with ``brk`` whenever the free space at its top passes
a few MiB (measured on the benchmark model: by 16 MB inside the attention backward and by 31.5 MB
when the autograd graph is released), and the next step grows it again, so every page of it is
mapped and zeroed anew by the kernel: 1,500-6,000 minor page faults per step of
``bench/train_overhead.py`` and about 37 ms of a 700 ms step. A caching GPU allocator keeps its
blocks for the same reason. Here glibc is told, once per process, to keep up to
:data:`TRIM_THRESHOLD` bytes of free heap and to serve blocks up to :data:`MMAP_THRESHOLD` (glibc's
maximum, 32 MiB on 64-bit) from the heap: the step's memory is then reused, the process's peak
resident memory stays what the step itself needs, and between steps up to the trim threshold of
freed memory stays mapped.

Applied by the Trainer on CPU (:func:`mvlm.train.trainer.Trainer`), not on a GPU (host memory is
not on the step's path there) and not by conversion, whose buffers are freed for good. Left alone
where the user chose: ``MVLM_CPU_MALLOC=0``, or glibc's own settings in the environment
(``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_MMAP_THRESHOLD_``, ``GLIBC_TUNABLES``), or another allocator
preloaded (``LD_PRELOAD`` of jemalloc / tcmalloc / mimalloc, which ignore ``mallopt``). Only glibc
on Linux has ``mallopt``; elsewhere nothing happens.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_THRESHOLD = -3
TRIM_THRESHOLD = 1 << 30  # free heap kept at the top before it is returned to the kernel
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)

_STATE: dict[str, object] = {}


def _user_choice() -> str | None:
    """Why the allocator is left as it is, or None."""
    if os.environ.get("MVLM_CPU_MALLOC", "1") == "0":
        return "MVLM_CPU_MALLOC=0"
    for var in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES"):
        if os.environ.get(var):
            return f"{var} is set"
    preload = os.environ.get("LD_PRELOAD", "")
    if any(name in preload for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return "another allocator is preloaded"
    return None


def tune_for_training() -> bool:
    """Set glibc's trim and mmap thresholds for a training loop (once per process); True when
    they are in effect, False where left alone (see the module doc for when and why)."""
    if "applied" in _STATE:
        return bool(_STATE["applied"])
    reason = _user_choice()
    if reason is None and not sys.platform.startswith("linux"):
        reason = "not Linux"
    libc = None
    if reason is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):
            reason = "no glibc mallopt"
    if reason is None:
        mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and \
            mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
        reason = None if ok else "mallopt refused the values"
    _STATE["applied"] = reason is None
    _STATE["reason"] = reason
    if reason is None:
        log.info("glibc malloc: trim threshold %d MiB, mmap threshold %d MiB (CPU training; "
                 "MVLM_CPU_MALLOC=0 keeps glibc's defaults)", TRIM_THRESHOLD >> 20,
                 MMAP_THRESHOLD >> 20)
    else:
        log.info("glibc malloc left as it is: %s", reason)
    return reason is None


def status() -> dict[str, object]:
    """Whether :func:`tune_for_training` ran and what it did (for logs and tests)."""
    return dict(_STATE)
