"""InternVL's image path as one module: HF's ``InternVLVisionModel`` (InternViT) and
``InternVLMultiModalProjector``, with the feature selection and pixel shuffle of
``InternVLModel.get_image_features`` in between (HF's own ``pixel_shuffle``), so the weights map
1:1 and the numerics are transformers'. Built on the first pipeline stage and replicated on every
TP rank, as the other towers (``mvlm.models.vision``).
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from mvlm.models.vision import vision_attn_impl


class InternVLTower(nn.Module):
    """forward(pixel_values [n_tiles, 3, H, W], None) -> projected features
    [n_tiles * image_seq_length, text_hidden], tile by tile in batch order (HF's order)."""

    def __init__(self, vision_tower: nn.Module, projector: nn.Module, feature_layer: int,
                 select_strategy: str, downsample_ratio: float) -> None:
        super().__init__()
        if not isinstance(feature_layer, int):
            raise ValueError(f"vision_feature_layer={feature_layer!r} in config.json: InternVL "
                             "takes one layer index (HF's get_image_features does too)")
        self.vision_tower = vision_tower
        self.multi_modal_projector = projector
        self.feature_layer = feature_layer
        self.select_strategy = select_strategy
        self.downsample_ratio = downsample_ratio

    @classmethod
    def build(cls, cfg: PretrainedConfig, dtype: torch.dtype, device: str) -> InternVLTower:
        from transformers.models.internvl.modeling_internvl import (
            InternVLMultiModalProjector,
            InternVLVisionModel,
        )

        cfg.vision_config._attn_implementation = vision_attn_impl(device)
        with torch.device("cpu" if device == "cpu" else device):
            tower = InternVLVisionModel._from_config(cfg.vision_config, dtype=dtype)
            projector = InternVLMultiModalProjector(cfg).to(dtype)
        return cls(tower, projector, cfg.vision_feature_layer,
                   cfg.vision_feature_select_strategy, cfg.downsample_ratio)

    def forward(self, pixel_values: torch.Tensor, grid: torch.Tensor | None = None
                ) -> torch.Tensor:
        from transformers.models.internvl.modeling_internvl import InternVLModel

        if grid is not None:
            raise ValueError("InternVL tiles take no grid: the batch was encoded for another "
                             "model")
        dtype = next(self.vision_tower.parameters()).dtype
        last = self.feature_layer == -1
        out = self.vision_tower(pixel_values=pixel_values.to(dtype), return_dict=True,
                                output_hidden_states=not last)
        feats = out.last_hidden_state if last else out.hidden_states[self.feature_layer]
        if self.select_strategy == "default":  # drop the CLS token
            feats = feats[:, 1:, :]
        n, tokens = feats.shape[:2]
        side = int(tokens ** 0.5)
        feats = feats.reshape(n, side, side, -1)
        # HF's method uses no state of the model: called unbound, it is exactly HF's arithmetic
        feats = InternVLModel.pixel_shuffle(None, feats, scale_factor=self.downsample_ratio)
        feats = self.multi_modal_projector(feats.reshape(n, -1, feats.shape[-1]))
        return feats.reshape(-1, feats.shape[-1])
