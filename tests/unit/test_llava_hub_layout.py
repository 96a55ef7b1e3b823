"""LLaVA checkpoints in either hub layout convert exactly, and one without its tower is refused.

Hub checkpoints saved before transformers 5 (llava-hf/llava-1.5-*) store the CLIP tower as
``vision_tower.vision_model.*``; transformers 5 writes ``vision_tower.*``. Both must convert with
``--verify`` logits equal to transformers (one rank, fp32: measured 0.0) and export to the same
tensors (in transformers 5's layout). A ``llava`` config whose weights lack the vision tower
fails before any output, naming the missing tensor.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

from helpers import assert_same_tensors, run_mvlm
from safetensors.torch import load_file, save_file

VERIFY_RX = re.compile(r"verify (\S+)\s+max\|dlogits\| = (\S+)")


def _rewrite(src: Path, dst: Path, fn) -> Path:
    shutil.copytree(src, dst)
    sd = load_file(dst / "model.safetensors")
    save_file(fn(sd), dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_pre_v5_tower_layout_converts_exactly(tiny_ckpt, tmp_path):
    hf = tiny_ckpt("llava")
    old = _rewrite(hf, tmp_path / "old", lambda sd: {
        re.sub(r"^vision_tower\.", "vision_tower.vision_model.", k): v for k, v in sd.items()})
    assert any(k.startswith("vision_tower.vision_model.") for k in load_file(
        old / "model.safetensors"))
    p = run_mvlm(["convert", "--to", "mcore", "--model", str(old), "--output",
                  str(tmp_path / "mc"), "--verify"])
    found = {m.group(1): float(m.group(2)) for m in VERIFY_RX.finditer(p.stdout)}
    assert set(found) == {"text", "image+text", "two-images"}, p.stdout[-2000:]
    assert max(found.values()) <= 5e-6, found
    run_mvlm(["convert", "--to", "hf", "--model", str(tmp_path / "mc"), "--output",
              str(tmp_path / "back")])
    assert assert_same_tensors(hf, tmp_path / "back") == len(load_file(hf / "model.safetensors"))


def test_missing_vision_tower_is_refused_by_name(tiny_ckpt, tmp_path):
    hf = tiny_ckpt("llava")
    bad = _rewrite(hf, tmp_path / "novis", lambda sd: {
        k: v for k, v in sd.items() if not k.startswith("vision_tower.")})
    out = tmp_path / "mc"
    p = run_mvlm(["convert", "--to", "mcore", "--model", str(bad), "--output", str(out)],
                 check=False)
    assert p.returncode != 0
    assert "vision_tower.embeddings.class_embedding" in p.stderr + p.stdout
    assert "missing" in p.stderr + p.stdout and not out.exists()

