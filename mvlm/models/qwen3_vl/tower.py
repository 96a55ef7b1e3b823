"""The Qwen3-VL vision tower as mvlm calls it: the HF module, kept whole, whose forward returns
the merged features and the DeepStack levels concatenated on the feature dim (one tensor per
media item, which the TP x CP image split gathers as is; :mod:`mvlm.models.deepstack` splits
it again)."""
from __future__ import annotations

import torch
from transformers import PretrainedConfig

from mvlm.models.vision import HFVisionTower, build_hf_vision


class DeepStackTower(HFVisionTower):
    """forward(pixel_values, grid_thw) -> [n_tokens, text_hidden * (1 + K)]."""

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        dtype = next(self.tower.parameters()).dtype
        out = self.tower(pixel_values.to(dtype), grid_thw=grid_thw)
        return torch.cat([out.pooler_output, *out.deepstack_features], dim=-1)


def build_tower(cfg: PretrainedConfig, dtype: torch.dtype, device: str) -> DeepStackTower:
    return DeepStackTower(build_hf_vision("transformers.models.qwen3_vl.modeling_qwen3_vl",
                                          "Qwen3VLVisionModel", cfg.vision_config, dtype,
                                          device).tower)
