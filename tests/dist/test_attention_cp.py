"""CP attention equals the CP=1 computation: torchrun on CPU/gloo, 2 and 4 ranks.

One launch per world size runs every case (plain/packed, causal/no_mask, parallel_state groups
and pg_collection groups), because each rank pays ~8 s to import megatron.core.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


@pytest.mark.parametrize("world", [2, 4])
def test_cp_attention_matches_single_rank(world: int) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone",  # rendezvous on a free local port
        f"--nproc-per-node={world}",
        str(HERE / "_attention_cp_worker.py"),
    ]
    proc = subprocess.run(
        cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240
    )
    report = [ln for ln in proc.stdout.splitlines() if ln.startswith(("[cp=", "CP="))]
    print("\n".join(sorted(report)))
    assert proc.returncode == 0, (
        f"CP={world} attention differs from CP=1 or the launch failed (rc={proc.returncode})\n"
        + proc.stdout[-4000:] + proc.stderr[-4000:]
    )
    assert any(ln.startswith(f"CP={world}:") and "OK" in ln for ln in report)
