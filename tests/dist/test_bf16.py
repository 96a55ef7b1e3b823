"""bf16: the Megatron model's logits track HF's in bf16, and a bf16 training run tracks fp32.

Two launches on the tiny Qwen2.5-VL (CPU; bf16 numerics on CPU are a logic check, the GPU
check script measures speed):

1. ``mvlm convert --to mcore --torch_dtype bfloat16 --verify``: the bf16 Megatron model against
   the HF model loaded in bf16, text / one image / two images;
2. one rank, ``_train_worker.py``: the same 3-step SFT in fp32 and with ``--torch_dtype
   bfloat16`` (Megatron's bf16 mixed precision: bf16 weights and activations, fp32 main
   weights and optimizer state).

Bars: see the constants (bf16 has 8 mantissa bits: a relative rounding step of 2^-8 = 3.9e-3).
"""
from __future__ import annotations

import pytest
from helpers import run_mvlm
from test_convert_roundtrip import VERIFY_RX, VL_CHECKS
from test_train_parity import _launch, _train_lines, common, write_data

pytestmark = pytest.mark.dist

# measured 2026-12-02 (megatron-core 0.16.1, torch 2.14 CPU):
BF16_LOGITS_TOL = 1.6e-2  # absolute; measured 7.8e-3 = one bf16 step for |logit| in [1, 2)
BF16_LOSS_TOL = 2e-4  # relative, verify loss mcore vs HF; measured 7.9e-5
TRAIN_LOSS_TOL = 5e-4  # relative, bf16 vs fp32 training loss per step; measured 1.8e-4
# and bf16 must really be in use: fp32 gives logits within 5e-7 and equal losses
MIN_BF16_EFFECT = 1e-6


def test_bf16_verify_and_training_track_fp32(tiny_ckpt, tmp_path):
    vl = tiny_ckpt("qwen2_5_vl")
    p = run_mvlm(["convert", "--to", "mcore", "--model", str(vl), "--output",
                  str(tmp_path / "mc"), "--torch_dtype", "bfloat16", "--verify",
                  "--verify_tol", "1.0"])
    found = {m.group(1): (float(m.group(2)), float(m.group(3)), float(m.group(4)))
             for m in VERIFY_RX.finditer(p.stdout)}
    assert set(found) == VL_CHECKS, p.stdout[-3000:]
    for name, (d, lm, lh) in found.items():
        print(f"bf16 verify {name}: max|dlogits|={d:.3e} loss mcore={lm:.6f} hf={lh:.6f}")
        assert d <= BF16_LOGITS_TOL and abs(lm - lh) / abs(lh) <= BF16_LOSS_TOL, (name, d, lm, lh)
    assert max(d for d, _, _ in found.values()) > 1e3 * MIN_BF16_EFFECT, "verify ran in fp32?"

    data, _ = write_data(tmp_path / "data")
    o32, o16 = tmp_path / "fp32", tmp_path / "bf16"
    _launch({"runs": [
        {"name": "fp32", "argv": common(vl, data, o32)},
        {"name": "bf16", "argv": common(vl, data, o16) + ["--torch_dtype", "bfloat16"]},
    ]}, 1, tmp_path, "single")
    a, b = _train_lines(o32), _train_lines(o16)
    rel = [abs(x["loss"] - y["loss"]) / abs(x["loss"]) for x, y in zip(a, b, strict=True)]
    print(f"bf16 vs fp32 losses: {[(x['loss'], y['loss']) for x, y in zip(a, b)]}; "
          f"max rel {max(rel):.2e}")
    assert len(b) == 3 and max(rel) <= TRAIN_LOSS_TOL
    assert max(rel) > MIN_BF16_EFFECT, "the bf16 run computed the fp32 losses: bf16 not applied"
    assert b[-1]["loss"] < b[0]["loss"], b
