"""Qwen2-VL: Qwen2 language model + ViT with 2-D RoPE and a 2x2 patch merger; 3-D mRoPE."""
from __future__ import annotations

from transformers import PretrainedConfig

from mvlm.convert.mapping import Replicated
from mvlm.models.decoder_table import decoder_table
from mvlm.models.gpt import TextArch
from mvlm.models.qwen2 import qwen2_text_arch
from mvlm.models.registry import Family, register
from mvlm.models.vision import build_hf_vision


def text_config(cfg: PretrainedConfig) -> PretrainedConfig:
    return getattr(cfg, "text_config", cfg)


def vl_text_arch(cfg: PretrainedConfig) -> TextArch:
    tc = text_config(cfg)
    arch = qwen2_text_arch(tc)
    arch.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False)
                                    or getattr(tc, "tie_word_embeddings", False))
    if not arch.mrope_section:
        raise ValueError("Qwen-VL config lacks rope_parameters.mrope_section: the checkpoint's "
                         "config.json is incomplete")
    return arch


def vl_mappings(cfg: PretrainedConfig, arch: TextArch):
    # On disk (hub layout, also what transformers 5 save_pretrained writes): model.layers.*,
    # lm_head.weight, visual.*
    return decoder_table(arch) + [Replicated("vision_model.tower.{*}", "visual.{*}")]


def vl_token_ids(cfg: PretrainedConfig) -> dict[str, int]:
    return {"image": cfg.image_token_id, "video": cfg.video_token_id,
            "vision_start": cfg.vision_start_token_id}


def _vision(cfg: PretrainedConfig, dtype, device):
    return build_hf_vision("transformers.models.qwen2_vl.modeling_qwen2_vl",
                           "Qwen2VisionTransformerPretrainedModel", cfg.vision_config, dtype,
                           device)


QWEN2_VL = register(Family(
    name="qwen2_vl",
    model_types=("qwen2_vl",),
    hf_model_class="Qwen2VLForConditionalGeneration",
    text_arch=vl_text_arch,
    mappings=vl_mappings,
    is_vlm=True,
    build_vision=_vision,
    token_ids=vl_token_ids,
    aligner_prefixes=("vision_model.tower.merger.",),
))
