"""Why a layout that divides a micro-batch's images over TP ranks cannot equal one rank bit for
bit: the tower's parameter gradients are then sums of per-image gradients (one backward per rank,
then the TP all-reduce of :mod:`mvlm.models.vision_parallel`) instead of one backward over all
images, another fp32 summation order for every weight gradient (``X^T dY`` over the rows).

On a tiny Qwen2-VL vision tower (HF's module, random weights), two images, a fixed upstream
gradient: in fp64 the two orders agree to 1e-12 (same mathematics); in fp32 they differ in the last
bits (measured max relative difference 2.6e-7, most elements differ; asserted > 0 and < 1e-6).
It is not what set the LoRA-at-TP2 DPO difference once seen at lr 5e-2 (1.33e-5 with the split
on and off alike): that was Adam's eps region turning the TP layout's rounding noise on
near-zero gradients into updates (tests/dist/test_dpo_objective.py, above TOLS).
"""
from __future__ import annotations

import torch
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel


def _grads(dtype: torch.dtype) -> tuple[dict, dict]:
    torch.manual_seed(0)
    cfg = Qwen2VLVisionConfig(depth=2, embed_dim=64, hidden_size=128, num_heads=4, mlp_ratio=2,
                              patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    cfg._attn_implementation = "sdpa"
    tower = Qwen2VisionTransformerPretrainedModel._from_config(cfg, dtype=dtype)
    grid = torch.tensor([[1, 4, 4], [1, 4, 4]])
    px = torch.randn(32, 3 * 2 * 14 * 14, dtype=dtype)

    def feats(rows: slice, g: torch.Tensor) -> torch.Tensor:
        out = tower(px[rows], grid_thw=g)
        return out.pooler_output if hasattr(out, "pooler_output") else out

    up = torch.randn(8, 128, dtype=dtype)  # 2 images x 16 patches / 4 (2x2 merge)
    (feats(slice(0, 32), grid) * up).sum().backward()  # one rank: both images in one call
    one = {n: p.grad.clone() for n, p in tower.named_parameters()}
    tower.zero_grad()
    for i in range(2):  # TP2 split: one image per rank, gradients summed
        (feats(slice(16 * i, 16 * i + 16), grid[i:i + 1]) * up[4 * i:4 * i + 4]).sum().backward()
    split = {n: p.grad.clone() for n, p in tower.named_parameters()}
    return one, split


def _worst(a: dict, b: dict) -> float:
    return max(float((a[n] - b[n]).abs().max() / a[n].abs().max().clamp(min=1e-30)) for n in a)


def test_split_changes_only_the_fp32_summation_order():
    one, split = _grads(torch.float64)
    assert _worst(one, split) < 1e-12
    one, split = _grads(torch.float32)
    worst = _worst(one, split)
    print(f"fp32 tower gradients, one call vs per image: max relative difference {worst:.2e}")
    assert 0 < worst < 1e-6
