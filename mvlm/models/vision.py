"""Vision towers kept in their HF implementation, wrapped to one calling convention.

The tower and its aligner (Qwen's patch merger) run on the first pipeline stage, replicated on
every TP rank: each rank computes the same image embeddings, whose gradients are also identical
across TP (the decoder's first column-parallel layer all-reduces its input grad), so no extra
collective is needed. The cost is that the ViT's FLOPs are repeated TP times; sharding it is a
later step. Keeping HF's module makes the vision weights map 1:1 and its numerics exact.
"""
from __future__ import annotations

import importlib

import torch
from torch import nn
from transformers import PretrainedConfig


def vision_attn_impl(device: str) -> str:
    if device == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


class HFVisionTower(nn.Module):
    """forward(pixel_values, grid_thw) -> merged embeddings [n_image_tokens, text_hidden]."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.tower = module

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        dtype = next(self.tower.parameters()).dtype
        out = self.tower(pixel_values.to(dtype), grid_thw=grid_thw)
        return out.pooler_output if hasattr(out, "pooler_output") else out


def build_hf_vision(module_path: str, class_name: str, vision_config: PretrainedConfig,
                    dtype: torch.dtype, device: str) -> HFVisionTower:
    cls = getattr(importlib.import_module(module_path), class_name)
    vision_config._attn_implementation = vision_attn_impl(device)
    with torch.device("cpu" if device == "cpu" else device):
        module = cls._from_config(vision_config, dtype=dtype)
    return HFVisionTower(module)
