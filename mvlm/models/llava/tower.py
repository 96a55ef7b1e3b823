"""LLaVA's image path as one module: the HF vision tower (CLIP / SigLIP, built by ``AutoModel``
from the checkpoint's vision config) and HF's ``LlavaMultiModalProjector``, kept whole so the
weights map 1:1 and the numerics are transformers'. Built on the first pipeline stage and
replicated on every TP rank, as the Qwen-VL towers (``mvlm.models.vision``).
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModel, PretrainedConfig

from mvlm.models.vision import vision_attn_impl


class LlavaTower(nn.Module):
    """forward(pixel_values [n, 3, H, W], None) -> projected features [n * tokens, text_hidden],
    image by image, in the order their ``<image>`` runs appear in the batch."""

    def __init__(self, vision_tower: nn.Module, projector: nn.Module,
                 feature_layer: int | list[int], select_strategy: str) -> None:
        super().__init__()
        if select_strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy={select_strategy!r} in config.json: "
                             "LLaVA defines 'default' (drop the CLS token) and 'full'")
        self.vision_tower = vision_tower
        self.multi_modal_projector = projector
        self.feature_layer = feature_layer
        self.select_strategy = select_strategy

    @classmethod
    def build(cls, cfg: PretrainedConfig, dtype: torch.dtype, device: str) -> LlavaTower:
        from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

        cfg.vision_config._attn_implementation = vision_attn_impl(device)
        with torch.device("cpu" if device == "cpu" else device):
            tower = AutoModel.from_config(cfg.vision_config, dtype=dtype)
            projector = LlavaMultiModalProjector(cfg).to(dtype)
        return cls(tower, projector, cfg.vision_feature_layer, cfg.vision_feature_select_strategy)

    def forward(self, pixel_values: torch.Tensor, grid: torch.Tensor | None = None
                ) -> torch.Tensor:
        if grid is not None:
            raise ValueError("LLaVA images take no grid: the batch was encoded for another model")
        dtype = next(self.vision_tower.parameters()).dtype
        out = self.vision_tower(pixel_values.to(dtype), output_hidden_states=True, return_dict=True)
        layers = [self.feature_layer] if isinstance(self.feature_layer, int) \
            else list(self.feature_layer)
        hidden = [out.hidden_states[i] for i in layers]
        if self.select_strategy == "default":  # drop the CLS token
            hidden = [h[:, 1:] for h in hidden]
        feats = self.multi_modal_projector(torch.cat(hidden, dim=-1))
        return feats.reshape(-1, feats.shape[-1])
