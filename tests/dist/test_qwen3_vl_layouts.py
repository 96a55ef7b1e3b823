"""Qwen3-VL and Qwen3-VL-MoE (DeepStack, interleaved mRoPE, timestamped video frames) against
transformers and against one rank: one one-rank launch (the MoE's SFT reference) and one two-rank
launch of ``_qwen3_vl_worker.py`` that runs every other check in one process group.

* Logits: Qwen3-VL under TP2 + sequence parallel and CP2, Qwen3-VL-MoE under EP2 (4 experts per
  rank): text, one image, two images of different sizes (``verify_against_hf``), a 4-frame video
  and an image + video row, logits and loss with labels; bars as test_convert_roundtrip (max
  |dlogits| <= 5e-6, |dloss| <= 1e-6 relative, floor 1). A 1% change of a DeepStack merger must
  move the video logits by far more than the bar.
* Qwen3-VL-MoE SFT parity: full fine-tuning (ViT, mergers, LLM with router and experts) on image
  and text rows, 3 steps, at TP2 + SP (MoE needs SP at TP > 1), PP2 (DeepStack's layers 0-1 on
  the first stage of the 4-layer decoder) and EP2: losses and grad norms as test_train_parity
  (5e-7 / 1e-5 relative to one rank).
* Qwen3-VL-MoE LoRA at EP2 (``all-linear``: attention and every expert): peft loads ``adapter/``
  onto ``Qwen3VLMoeForConditionalGeneration`` with the merged export's logits (bound 1e-5).

Measured 2026-12-02: logits TP2+SP 5.4e-7 (video 4.8e-7), CP2 0.0, MoE EP2 5.4e-7 (video
5.4e-7); MoE SFT rel |dloss| TP2+SP 7.6e-8, PP2 3.8e-8, EP2 4.5e-8 (grad norms <= 1.8e-6);
MoE LoRA peft vs merged 4.2e-7 (adapters moved the logits by 1.8). The
round trip (Qwen3-VL TP2xPP2 saved, TP1 /
TP2 / PP2 exports; Qwen3-VL-MoE saved at EP2) is a case of test_convert_roundtrip.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_convert_roundtrip import LOGITS_TOL, LOSS_TOL, VL_CHECKS
from test_train_parity import GNORM_TOL, STEPS, _launch, _train_lines, common, write_data

pytestmark = pytest.mark.dist

HERE = Path(__file__).resolve().parent
SFT_LOSS_TOL = 5e-7  # as test_train_parity
LORA_TOL = 1e-5
MOE_LAYOUTS = {"tp2_sp": ["--tp", "2", "--sequence_parallel", "true"], "pp2": ["--pp", "2"],
               "ep2": ["--ep", "2"]}


def _lora_argv(ckpt: Path, data: Path, out: Path) -> list[str]:
    return common(ckpt, data, out, steps=2) + [
        "--train_type", "lora", "--lora_rank", "4", "--lora_alpha", "8", "--lora_dropout", "0",
        "--target_modules", "all-linear", "--lr", "5e-2", "--global_batch_size", "2",
        "--save_safetensors", "true", "--ep", "2", "--save_final_checkpoint", "true",
        "--freeze_vit", "true", "--freeze_aligner", "true"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_ckpt):
    from helpers import launch_worker

    tmp = tmp_path_factory.mktemp("q3vl")
    dense, moe = tiny_ckpt("qwen3_vl"), tiny_ckpt("qwen3_vl_moe")
    data, _ = write_data(tmp / "data")
    out = {k: tmp / k for k in ("ref", "lora", *MOE_LAYOUTS)}
    _launch({"runs": [{"name": "ref", "argv": common(moe, data, out["ref"])}]}, 1, tmp, "ref")
    spec = tmp / "spec_two.json"
    spec.write_text(json.dumps({"runs": [
        *({"name": k, "argv": common(moe, data, out[k]) + v} for k, v in MOE_LAYOUTS.items()),
        {"name": "lora", "argv": _lora_argv(moe, data, out["lora"])}]}))
    res_file = tmp / "res.json"
    launch_worker(HERE / "_qwen3_vl_worker.py", 2, [dense, moe, spec, res_file], timeout=1200)
    return {"tmp": tmp, "out": out, "moe": moe, "data": data,
            "res": json.loads(res_file.read_text())}


@pytest.mark.parametrize("lay", ["tp2_sp", "cp2", "moe_ep2"])
def test_matches_hf_on_images_and_video(runs, lay):
    res = runs["res"][lay]
    assert set(res["checks"]) == VL_CHECKS | {"video", "image+video"}, res
    for name, (d, lm, lh) in res["checks"].items():
        print(f"{lay}: {name}: max|dlogits|={d:.3e} loss mcore={lm:.6f} hf={lh:.6f}")
        assert d <= LOGITS_TOL and abs(lm - lh) <= LOSS_TOL * max(1.0, abs(lh)), \
            (lay, name, d, lm, lh)
    assert res["perturbed_video_dlogits"] > 100 * LOGITS_TOL, res


@pytest.mark.parametrize("lay", list(MOE_LAYOUTS))
def test_moe_sft_parity(runs, lay):
    from helpers import assert_sft_parity

    assert_sft_parity(_train_lines(runs["out"]["ref"]), _train_lines(runs["out"][lay]),
                      f"qwen3_vl_moe {lay}", STEPS, SFT_LOSS_TOL, GNORM_TOL)


def test_moe_lora_peft_equals_merged(runs):
    import torch
    import transformers
    from helpers import peft_vs_merged

    from mvlm.data.template import get_template
    from mvlm.models.registry import get_family

    base, run = runs["moe"], runs["out"]["lora"]
    spec = get_family("qwen3_vl_moe")

    def load(path):
        return transformers.Qwen3VLMoeForConditionalGeneration.from_pretrained(
            path, dtype=torch.float32).eval()

    row = next(r for r in map(json.loads, runs["data"].read_text().splitlines())
               if r.get("images"))
    enc = get_template(base).encode(row)
    batch = {k: v for k, v in enc.items() if k in spec.batch_keys}
    inputs = spec.hf_forward_inputs(load(base).config,
                                    {"input_ids": enc["input_ids"][None], **batch})
    d, moved, names = peft_vs_merged(load, base, run, runs["tmp"] / "merged", inputs)
    assert any("self_attn" in n for n in names) and any("mlp.experts" in n for n in names), names
    print(f"qwen3_vl_moe LoRA EP2: peft vs merged max|dlogits| {d:.2e}; trained vs base "
          f"{moved:.2e}")
    assert d <= LORA_TOL
    assert moved > 1e-2
