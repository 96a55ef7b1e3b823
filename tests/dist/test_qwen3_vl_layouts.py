"""Qwen3-VL (DeepStack, interleaved mRoPE, timestamped video frames) against transformers under
TP2 + sequence parallel and CP2: one two-rank launch of ``_qwen3_vl_worker.py``.

Checked per layout: text, one image, two images of different sizes (``verify_against_hf``), a
4-frame video and an image + video row, logits and loss with labels; bars as
test_convert_roundtrip (max |dlogits| <= 5e-6, |dloss| <= 1e-6 relative, floor 1). A 1% change
of a DeepStack merger must move the video logits by far more than the bar. Measured 2026-12-02:
TP2+SP max |dlogits| 5.4e-7 (video 4.8e-7), CP2 0.0; perturbed merger 4.2e-3.
The round trip (TP2xPP2 saved; TP1, TP2, PP2 exports) is a case of test_convert_roundtrip.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_convert_roundtrip import LOGITS_TOL, LOSS_TOL, VL_CHECKS

pytestmark = pytest.mark.dist

HERE = Path(__file__).resolve().parent


def test_qwen3_vl_matches_hf_under_tp_sp_and_cp(tiny_ckpt, tmp_path):
    from helpers import launch_worker

    hf = tiny_ckpt("qwen3_vl")
    res_file = tmp_path / "res.json"
    launch_worker(HERE / "_qwen3_vl_worker.py", 2, [hf, res_file], timeout=900)
    res = json.loads(res_file.read_text())
    for lay in ("tp2_sp", "cp2"):
        assert set(res[lay]["checks"]) == VL_CHECKS | {"video", "image+video"}, res
        for name, (d, lm, lh) in res[lay]["checks"].items():
            print(f"{lay}: {name}: max|dlogits|={d:.3e} loss mcore={lm:.6f} hf={lh:.6f}")
            assert d <= LOGITS_TOL and abs(lm - lh) <= LOSS_TOL * max(1.0, abs(lh)), \
                (lay, name, d, lm, lh)
        assert res[lay]["perturbed_video_dlogits"] > 100 * LOGITS_TOL, res[lay]
