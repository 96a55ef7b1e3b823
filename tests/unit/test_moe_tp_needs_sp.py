"""MoE at TP > 1 trains only with sequence parallel (Megatron-Core's MoE layer raises in the first
training forward otherwise): mvlm refuses it before any process group, naming the fix, while
``mvlm convert`` / export (no training, ``sequence_parallel=None``) still split MoE over TP."""
from __future__ import annotations

import pytest
from transformers import AutoConfig

from mvlm.models.gpt import LayoutError, validate_layout
from mvlm.models.registry import get_family
from mvlm.runtime.parallel import ParallelLayout
from mvlm.train.args import parse_train_args
from mvlm.train.setup import plan_run

FIX = "--sequence_parallel true"


def _arch(path):
    hf = AutoConfig.from_pretrained(path)
    return get_family(hf.model_type).text_arch(hf)


def test_validate_layout_moe_tp(tiny_ckpt):
    moe, dense = _arch(tiny_ckpt("qwen3_moe")), _arch(tiny_ckpt("qwen2_5_vl"))
    assert moe.num_experts and dense.num_experts is None
    tp2 = ParallelLayout(tp=2)
    with pytest.raises(LayoutError, match=f"MoE .* --tp 2 .*{FIX}"):
        validate_layout(moe, tp2, sequence_parallel=False)
    validate_layout(moe, tp2, sequence_parallel=True)
    validate_layout(moe, tp2)  # convert / export: not training
    validate_layout(moe, ParallelLayout(ep=2), sequence_parallel=False)
    validate_layout(dense, tp2, sequence_parallel=False)


def test_training_refuses_moe_tp_without_sp(tiny_ckpt, tmp_path, monkeypatch):
    """The trainer's cheap checks (plan_run) reach the refusal with the parsed flags."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    base = ["--model", str(tiny_ckpt("qwen3_moe")), "--dataset", str(data),
            "--output_dir", str(tmp_path / "o"), "--tp", "2"]
    with pytest.raises(LayoutError, match=FIX):
        plan_run(parse_train_args(base, "sft"))
    plan = plan_run(parse_train_args(base + ["--sequence_parallel", "true"], "sft"))
    assert plan.layout.tp == 2
