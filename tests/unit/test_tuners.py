"""LoRA/DoRA: target resolution (pure), and single-rank numerics against peft itself.

The numeric checks run in one torchrun rank (``tests/dist/_tuners_worker.py``, ``import
megatron`` paid once for LoRA and DoRA): after 3 training steps on the tiny Qwen2-VL (LLM
all-linear + vision tower adapted, lm_head in modules_to_save), the mvlm logits must equal
(1) transformers + ``peft.PeftModel.from_pretrained`` on the exported adapter directory and
(2) transformers on the merged export, within 1e-5 (fp32); (3) reloading the adapter directory
into a fresh mvlm model gives the same logits; base weights stay bit-identical throughout.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
WORKER = HERE.parent / "dist" / "_tuners_worker.py"
TOL = 1e-5  # absolute on logits; measured 1.7e-6 (LoRA merged, DoRA peft and merged)


def test_target_resolution():
    from mvlm.tuners.model import AdapterConfig, _wanted
    from mvlm.tuners.peft_io import _target_modules

    qkv = "decoder.layers.3.self_attention.linear_qkv"
    fc1 = "decoder.layers.0.mlp.experts.local_experts.5.linear_fc1"
    vis = "vision_model.tower.blocks.0.attn.qkv"
    assert _wanted(qkv, AdapterConfig(target_modules=["q_proj"]))
    assert _wanted(fc1, AdapterConfig(target_modules=["up_proj"]))
    assert not _wanted(fc1, AdapterConfig(target_modules=["linear_qkv"]))
    assert _wanted(fc1, AdapterConfig(target_modules=["all-linear"]))
    assert not _wanted("output_layer", AdapterConfig(target_modules=["all-linear"]))
    assert not _wanted(vis, AdapterConfig(target_modules=["all-linear"]))
    assert _wanted(vis, AdapterConfig(target_modules=["all-linear"], include_vision=True))
    assert _wanted(vis, AdapterConfig(target_modules=["qkv"], include_vision=True))
    rx = AdapterConfig(target_modules=[], target_regex=r"decoder\.layers\.3\..*linear_qkv")
    assert _wanted(qkv, rx) and not _wanted(qkv.replace(".3.", ".2."), rx)
    with pytest.raises(ValueError, match="lora_rank"):
        AdapterConfig(rank=0)
    with pytest.raises(ValueError, match="lora or dora"):
        AdapterConfig(kind="ia3")
    assert _target_modules(["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"]) \
        == ["q_proj", "up_proj"]
    assert _target_modules(["model.visual.blocks.0.attn.qkv"]).startswith("^(")


@pytest.mark.timeout(900)
def test_peft_and_merged_exports_match_mvlm(tiny_ckpt, tmp_path):
    from helpers import free_port

    hf = tiny_ckpt("qwen2_vl")
    cases = [{"name": k, "kind": k, "peft_checks": True, "dir": str(tmp_path / k)}
             for k in ("lora", "dora")]
    spec = tmp_path / "spec.json"
    out = tmp_path / "out.json"
    spec.write_text(json.dumps({"hf": str(hf), "out": str(out), "cases": cases}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=1",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", str(WORKER), str(spec)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    res = json.loads(out.read_text())
    for k in ("lora", "dora"):
        c = res[k]
        assert c["base_vs_mvlm"] > 1e-2, c  # the adapters change the model
        print(k, {x: c[x] for x in ("peft_vs_mvlm", "merged_vs_mvlm", "reload_vs_mvlm")})
        assert c["peft_vs_mvlm"] <= TOL, c
        assert c["merged_vs_mvlm"] <= TOL, c
        assert c["reload_vs_mvlm"] <= 1e-6, c  # measured 0
        assert c["base_changed_after_export"] == 0, c
        cfg = json.loads((tmp_path / k / "adapter" / "adapter_config.json").read_text())
        assert cfg["use_dora"] == (k == "dora") and cfg["peft_type"] == "LORA"
        assert cfg["modules_to_save"] == ["lm_head"]
