"""TextArch options under tensor and pipeline parallelism (two ranks, gloo, fp32).

The test-only StarCoder2 and Nemotron families (tests/arch_families.py: LayerNorm with biases,
zero-centred LayerNorm, ungated gelu_pytorch_tanh / relu2 MLPs, biases on every linear or on
o_proj without the MLP, partial rotary) are converted HF -> Megatron at TP2 and back at PP2,
each with ``--verify`` against transformers: column-split fc1 biases, replicated o_proj / fc2 /
norm biases, and the tied embedding across stages. Bound: logits within 5e-6 (as
test_convert_roundtrip), loss within 1e-6 relative; every exported tensor bit-identical.
One conversion per torchrun launch (four launches).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.dist

HERE = Path(__file__).resolve().parent
# measured 2026-12-02: Nemotron TP2 1.0e-6, StarCoder2 TP2 4.8e-7, PP2 <= 3.6e-7
LOGITS_TOL = 5e-6


@pytest.mark.timeout(1200)
def test_options_tp2_pp2_against_transformers(tmp_path):
    from arch_families import NAMES, build
    from helpers import assert_same_tensors, launch_worker

    for name in NAMES:
        src = build(name, tmp_path / name / "hf")
        mcore, back = tmp_path / name / "mcore", tmp_path / name / "back"
        for step, argv in (("TP2", ["--to", "mcore", "--model", str(src), "--output",
                                    str(mcore), "--tp", "2"]),
                           ("PP2", ["--to", "hf", "--model", str(mcore), "--output", str(back),
                                    "--pp", "2"])):
            spec, out = tmp_path / f"{name}_{step}.json", tmp_path / f"{name}_{step}_out.json"
            spec.write_text(json.dumps({"argv": [*argv, "--verify", "--device", "cpu"],
                                        "out": str(out)}))
            launch_worker(HERE / "_arch_options_worker.py", 2, [spec], timeout=600, expect=None)
            (r,) = json.loads(out.read_text())
            lm, lh = r["loss"]
            print(f"{name} at {step}: max|dlogits| {r['dlogits']:.3e} loss mcore {lm:.6f} "
                  f"hf {lh:.6f}")
            assert r["dlogits"] <= LOGITS_TOL
            assert abs(lm - lh) <= 1e-6 * max(1.0, abs(lh))
        assert assert_same_tensors(src, back) > 0
