"""A checkpoint whose weights do not match its config is refused before any output, naming every
missing and every unexpected tensor (``mvlm.convert.bridge._check_keys``), grouped by prefix with
counts so that a list of thousands stays readable (``summarize_names``).

End to end: an ``internvl`` config over a LLaVA-1.5 checkpoint's weights (CLIP tower, LLaVA's
projector): ``mvlm convert --to mcore`` fails with no output directory, the message counts exactly
the InternVL tensors the file lacks and the LLaVA tensors no rank loads (computed here from the
two files' key sets), and names members of both groups.
"""
from __future__ import annotations

import re
import shutil

from helpers import run_mvlm
from safetensors.torch import load_file, save_file

from mvlm.convert.bridge import summarize_names


def test_summary_counts_groups_and_truncates():
    names = [f"model.layers.{i}.mlp.{p}.weight" for i in range(40) for p in ("up", "down")]
    names += ["lm_head.weight", "vision_tower.embeddings.cls_token",
              "vision_tower.embeddings.patch.weight"]
    s = summarize_names(names, per_group=2)
    assert s.startswith("83: model.layers.* (80: model.layers.0.mlp.down.weight, "
                        "model.layers.0.mlp.up.weight, ...)"), s
    assert "vision_tower.embeddings.* (2: vision_tower.embeddings.cls_token, " \
           "vision_tower.embeddings.patch.weight)" in s
    assert "lm_head.weight (1: lm_head.weight)" in s
    many = summarize_names([f"g{i}.x.y" for i in range(15)], max_groups=10)
    assert many.endswith("; and 5 more groups") and many.startswith("15: ")
    assert len(summarize_names([f"a.{i}.b" for i in range(5000)])) < 200


def test_foreign_weights_refused_naming_all_keys(tiny_ckpt, tmp_path):
    src, other = tiny_ckpt("internvl"), tiny_ckpt("llava")
    own, foreign = load_file(src / "model.safetensors"), load_file(other / "model.safetensors")
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    save_file(foreign, bad / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "mc"
    p = run_mvlm(["convert", "--to", "mcore", "--model", str(bad), "--output", str(out)],
                 check=False)
    log = p.stderr + p.stdout
    assert p.returncode != 0 and not out.exists()
    n_missing, n_unexpected = len(set(own) - set(foreign)), len(set(foreign) - set(own))
    assert n_missing > 10 and n_unexpected > 10
    assert re.search(rf"missing tensors {n_missing}: ", log), log[-3000:]
    assert re.search(rf"unexpected tensors, loaded into no rank {n_unexpected}: ", log), log[-3000:]
    assert "vision_tower.embeddings.cls_token" in log  # InternViT's, absent from the file
    assert "vision_tower.embeddings.class_embedding" in log  # CLIP's, loaded by no rank
    assert "is this a internvl checkpoint" in log
