"""LLaVA-1.5's shape -- a Llama LLM under ``language_model.`` -- converts exactly at TP2.

The tiny LLaVA with ``text_model_type="llama"`` (no QKV bias; the Llama family's weight table
re-prefixed): ``--verify`` logits vs transformers on text, one and two images within 5e-6
(measured 4.8e-7), and the TP1 export bit-identical to the original.
"""
from __future__ import annotations

import json
import re

import pytest
from helpers import assert_same_tensors, run_mvlm
from safetensors.torch import load_file

pytestmark = pytest.mark.dist

VERIFY_RX = re.compile(r"verify (\S+)\s+max\|dlogits\| = (\S+)")


def test_llama_llm_at_tp2_converts_exactly(tiny_ckpt, tmp_path):
    """LLaVA-1.5's shape: the LLM is Llama (no QKV bias, its own weight table under
    ``language_model.``); at TP2 the logits equal transformers' and the export is the same."""
    hf = tiny_ckpt("llava", text_model_type="llama")
    assert json.loads((hf / "config.json").read_text())["text_config"]["model_type"] == "llama"
    p = run_mvlm(["convert", "--to", "mcore", "--model", str(hf), "--output",
                  str(tmp_path / "mc"), "--tp", "2", "--verify"], nproc=2)
    found = {m.group(1): float(m.group(2)) for m in VERIFY_RX.finditer(p.stdout)}
    assert set(found) == {"text", "image+text", "two-images"}, p.stdout[-2000:]
    print(found)
    assert max(found.values()) <= 5e-6, found
    run_mvlm(["convert", "--to", "hf", "--model", str(tmp_path / "mc"), "--output",
              str(tmp_path / "back")])
    assert assert_same_tensors(hf, tmp_path / "back") == len(load_file(hf / "model.safetensors"))
