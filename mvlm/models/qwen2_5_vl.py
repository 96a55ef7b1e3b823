"""Qwen2.5-VL: as Qwen2-VL, with a SwiGLU/RMSNorm ViT using window attention (full attention in
``fullatt_block_indexes``) and video time scaled by ``second_per_grid_ts`` in mRoPE."""
from __future__ import annotations

from transformers import PretrainedConfig

from mvlm.models.qwen2_vl import vl_mappings, vl_text_arch, vl_token_ids
from mvlm.models.registry import Family, register
from mvlm.models.vision import build_hf_vision


def _vision(cfg: PretrainedConfig, dtype, device):
    return build_hf_vision("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl",
                           "Qwen2_5_VisionTransformerPretrainedModel", cfg.vision_config, dtype,
                           device)


QWEN2_5_VL = register(Family(
    name="qwen2_5_vl",
    model_types=("qwen2_5_vl",),
    hf_model_class="Qwen2_5_VLForConditionalGeneration",
    text_arch=vl_text_arch,
    mappings=vl_mappings,
    is_vlm=True,
    build_vision=_vision,
    token_ids=vl_token_ids,
    aligner_prefixes=("vision_model.tower.merger.",),
))
