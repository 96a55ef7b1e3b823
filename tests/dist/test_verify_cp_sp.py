"""`--verify` (logits and loss of the Megatron model against HF) under CP and sequence parallel.

One two-rank launch of ``_verify_cp_sp_worker.py`` on the tiny Qwen2.5-VL (text, one image, two
images): ``verify_against_hf`` on a TP2 + sequence-parallel build and on a CP2 build, each with a
perturbed weight that the same check must reject, and ``mvlm convert --to mcore --cp 2 --verify``
through the CLI. Bars as in test_convert_roundtrip: max |dlogits| <= 5e-6, |dloss| <= 1e-6
relative (floor 1). Measured 2026-12-02: SP 5.4e-7; CP2 0.0 (at TP1 the CP path runs the same
per-query kernels as HF).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_convert_roundtrip import LOGITS_TOL, LOSS_TOL, VL_CHECKS, _check_verify_output

pytestmark = pytest.mark.dist

HERE = Path(__file__).resolve().parent


def test_verify_under_sp_and_cp(tiny_ckpt, tmp_path):
    from helpers import launch_worker

    hf = tiny_ckpt("qwen2_5_vl")
    res_file, mcore = tmp_path / "res.json", tmp_path / "mcore_cp2"
    p = launch_worker(HERE / "_verify_cp_sp_worker.py", 2, [hf, res_file, mcore], timeout=900)
    res = json.loads(res_file.read_text())
    for lay in ("sp", "cp"):
        assert set(res[lay]["checks"]) == VL_CHECKS, res
        for name, (d, lm, lh) in res[lay]["checks"].items():
            print(f"{lay}: {name}: max|dlogits|={d:.3e} loss mcore={lm:.6f} hf={lh:.6f}")
            assert d <= LOGITS_TOL and abs(lm - lh) <= LOSS_TOL * max(1.0, abs(lh)), \
                (lay, name, d, lm, lh)
        assert res[lay]["perturbed_caught"], f"{lay}: verify passed a perturbed weight"
    print("CP2 via mvlm convert --verify:")
    _check_verify_output(p.stdout, VL_CHECKS)
    assert (mcore / "mvlm_meta.json").exists()
