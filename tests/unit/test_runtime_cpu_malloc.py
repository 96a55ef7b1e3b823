"""mvlm/runtime/cpu_malloc.py: freed step memory is kept by glibc instead of re-faulted.

Each case runs in a fresh interpreter (allocator settings are per process). The allocation
pattern is a training step's in miniature, made with glibc's own ``malloc``/``free`` (what torch's
CPU allocator calls) so that no Python object can land on the heap's top and change when glibc
trims it: one large block allocated and freed first (glibc then raises its dynamic mmap
threshold to that size and its trim threshold to twice it), then steps that fill 32 blocks of
4 MiB and free them all. With glibc's defaults every step's heap is returned to the kernel and
faulted in again; with the training settings the heap is kept and reused. Minor page faults are
counted with ``getrusage``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

_STEPS = """
import ctypes, json, resource, sys
from mvlm.runtime import cpu_malloc
applied = cpu_malloc.tune_for_training() if sys.argv[1] == "1" else None
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
MIB = 1 << 20
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
big = libc.malloc(8 * MIB)  # glibc's defaults: mmapped, and freeing it raises the thresholds
ctypes.memset(big, 1, 8 * MIB)
libc.free(big)
def step():
    blocks = [libc.malloc(4 * MIB) for _ in range(32)]  # 32 x 4 MiB, every page written
    for p in blocks:
        ctypes.memset(p, 1, 4 * MIB)
    for p in reversed(blocks):
        libc.free(p)
for _ in range(2):
    step()
f = faults()
for _ in range(3):
    step()
print(json.dumps({"applied": applied, "status": cpu_malloc.status(),
                  "faults": (faults() - f) / 3}))
"""

_GLIBC_VARS = ("MVLM_CPU_MALLOC", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_",
               "GLIBC_TUNABLES", "LD_PRELOAD")


def _run(tune: bool, **env: str) -> dict:
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's mallopt and getrusage fault counts are Linux's")
    clean = {k: v for k, v in os.environ.items() if k not in _GLIBC_VARS}
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(_STEPS), "1" if tune else "0"],
                         capture_output=True, text=True, timeout=120, env={**clean, **env})
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_training_settings_keep_freed_step_memory() -> None:
    tuned = _run(True)
    default = _run(False)
    assert tuned["applied"] is True and tuned["status"] == {"applied": True, "reason": None}
    # 128 MiB written per step = 32,768 pages, more than twice glibc's largest dynamic mmap
    # threshold (32 MiB) however high imports pushed it: glibc's defaults fault (nearly) all of
    # them again every step, the training settings none once the heap has grown.
    assert default["faults"] > 16000, default
    assert tuned["faults"] < 50, tuned


@pytest.mark.parametrize("env, reason", [
    ({"MVLM_CPU_MALLOC": "0"}, "MVLM_CPU_MALLOC=0"),
    ({"MALLOC_TRIM_THRESHOLD_": "131072"}, "MALLOC_TRIM_THRESHOLD_ is set"),
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"}, "GLIBC_TUNABLES is set"),
])
def test_user_settings_win(env: dict, reason: str) -> None:
    out = _run(True, **env)
    assert out["applied"] is False
    assert out["status"] == {"applied": False, "reason": reason}
    if "MVLM_CPU_MALLOC" in env:  # glibc's defaults: the step is faulted in again
        assert out["faults"] > 16000, out
