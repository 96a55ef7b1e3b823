"""Packed sequences through the Megatron VLM: no attention across samples, equal loss."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_packed_samples_do_not_interact(tmp_path):
    p = subprocess.run([sys.executable, str(HERE / "_packing_worker.py"), str(tmp_path)],
                       capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    print(p.stdout)
    assert p.returncode == 0 and "OK" in p.stdout, p.stdout[-3000:] + p.stderr[-5000:]
