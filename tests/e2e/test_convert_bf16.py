"""A bf16 checkpoint survives HF -> mcore -> HF bit for bit and keeps its dtype."""
from __future__ import annotations

import json

import torch
from helpers import assert_same_tensors, load_all_safetensors, run_mvlm


def test_bf16_roundtrip(tmp_path):
    from mvlm.testing.tiny_models import build_tiny_checkpoint

    hf = build_tiny_checkpoint("qwen2_5_vl", tmp_path / "hf", dtype=torch.bfloat16)
    mc, back = tmp_path / "mcore", tmp_path / "back"
    run_mvlm(["convert", "--to", "mcore", "--model", str(hf), "--output", str(mc)])
    assert json.loads((mc / "mvlm_meta.json").read_text())["dtype"] == "bfloat16"
    run_mvlm(["convert", "--to", "hf", "--model", str(mc), "--output", str(back)])
    assert assert_same_tensors(hf, back) > 50
    assert all(t.dtype == torch.bfloat16 for t in load_all_safetensors(back).values())
