"""Preference pairs packed into one row through the Megatron VLM: per-sequence log-probs equal
each sequence alone, and the step-0 DPO invariant (ln 2) through the model."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_packed_pairs_logps_and_step0(tmp_path):
    p = subprocess.run([sys.executable, str(HERE / "_preference_pair_worker.py"), str(tmp_path)],
                       capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    print(p.stdout)
    assert p.returncode == 0 and "OK" in p.stdout, p.stdout[-3000:] + p.stderr[-5000:]
