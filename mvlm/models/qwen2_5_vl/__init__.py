"""Qwen2.5-VL: as Qwen2-VL (same decoder, weight layout, media keys, template), with a
SwiGLU/RMSNorm ViT using window attention (full attention in ``fullatt_block_indexes``) and
video time scaled by ``second_per_grid_ts * tokens_per_second`` in mRoPE.

The files of a family, shown on this one (docs/architecture.md walks through them):
``__init__.py`` (this spec), ``weights.py`` (mapping table), ``template.py`` (chat template and
vision-token expansion), ``tiny.py`` (the tiny config its tests build).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from mvlm.models.qwen2_vl import (
    ALIGNER_PREFIXES,
    MEDIA,
    MODULE_TREE_PREFIXES,
    PEFT_TOWER_PREFIXES,
    hf_forward_inputs,
    mrope_position_ids,
    vl_text_arch,
)
from mvlm.models.registry import FamilySpec, VisionSpec, register

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PretrainedConfig


def position_ids(hf_config: PretrainedConfig, input_ids: torch.Tensor,
                 media: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Qwen-VL mRoPE; videos advance time by tokens_per_second per second of the grid."""
    tps = getattr(getattr(hf_config, "vision_config", None), "tokens_per_second", None)
    return mrope_position_ids(hf_config, input_ids, media, tokens_per_second=tps)


def _vision(cfg: PretrainedConfig, dtype: torch.dtype, device: str) -> nn.Module:
    from mvlm.models.vision import build_hf_vision

    return build_hf_vision("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl",
                           "Qwen2_5_VisionTransformerPretrainedModel", cfg.vision_config, dtype,
                           device)


QWEN2_5_VL = register(FamilySpec(
    name="qwen2_5_vl",
    model_types=("qwen2_5_vl",),
    hf_model_class="Qwen2_5_VLForConditionalGeneration",
    text_arch=vl_text_arch,
    weights="mvlm.models.qwen2_5_vl.weights:mappings",
    template="mvlm.models.qwen2_5_vl.template:Qwen2_5VLTemplate",
    tiny="mvlm.models.qwen2_5_vl.tiny:TINY",
    vision=VisionSpec(build=_vision, media=MEDIA, aligner_prefixes=ALIGNER_PREFIXES,
                      peft_tower_prefixes=PEFT_TOWER_PREFIXES),
    position_ids=position_ids,
    hf_forward_inputs=hf_forward_inputs,
    module_tree_prefixes=MODULE_TREE_PREFIXES,
))
