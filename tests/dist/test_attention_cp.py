"""CP attention equals the CP=1 computation: torchrun on CPU/gloo, 2 and 4 ranks.

One launch per world size runs every case (plain/packed, causal/no_mask, parallel_state groups
and pg_collection groups), because each rank pays ~8 s to import megatron.core.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


@pytest.mark.parametrize("world", [2, 4])
def test_cp_attention_matches_single_rank(world: int) -> None:
    from helpers import launch_worker

    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    # A non-zero exit means CP attention differed from CP=1 (or the launch failed).
    proc = launch_worker(HERE / "_attention_cp_worker.py", world, timeout=240,
                         env={"PYTHONPATH": pythonpath}, expect=None, tail=8000)
    report = [ln for ln in proc.stdout.splitlines() if ln.startswith(("[cp=", "CP="))]
    print("\n".join(sorted(report)))
    assert any(ln.startswith(f"CP={world}:") and "OK" in ln for ln in report)
