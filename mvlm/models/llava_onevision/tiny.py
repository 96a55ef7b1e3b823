"""The tiny LLaVA-OneVision its tests build: a 3-layer SigLIP ViT (no CLS, ``"full"`` features of
the last layer), the 2-layer projector and a Qwen2 LLM with ChatML. Tiles are 28 x 28 (4 x 4
patches of 7 px: 16 tokens a tile), pinpoints ``28x56, 56x28, 56x56``, and ``anyres_max_2`` so a
4-tile image (8 x 8 patch grid = 4 base tiles) is shrunk by the bilinear step. Videos: 28 x 28
frames pooled to 2 x 2 (4 tokens a frame) plus one newline.
"""
from __future__ import annotations

from typing import Any

import transformers

from mvlm.testing.tiny_models import (
    IMAGE_PARTS,
    TinySpec,
    chatml_template,
    check_vocab,
    text_fields,
)

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
SPECIALS = (IMAGE_TOKEN, VIDEO_TOKEN)
TILE = 28
PATCH = 7
PINPOINTS = [[28, 56], [56, 28], [56, 56]]

# ChatML with OneVision's image/video tokens, written for this project.
CHAT_TEMPLATE = chatml_template({IMAGE_PARTS: IMAGE_TOKEN, ("video",): VIDEO_TOKEN})

_VISION = {
    "default": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4},
    "indivisible": {"hidden_size": 48, "intermediate_size": 96, "num_attention_heads": 3},
    "bench": {"hidden_size": 512, "intermediate_size": 1376, "num_attention_heads": 8},
}
_TOP_FIELDS = ("tie_word_embeddings", "vision_feature_layer", "vision_feature_select_strategy",
               "vision_aspect_ratio", "image_grid_pinpoints", "multimodal_projector_bias")


def config(variant: str, ids: dict[str, int], overrides: dict[str, Any]
           ) -> transformers.PretrainedConfig:
    vision_overrides = overrides.pop("vision_config", None) or {}
    top = {k: overrides.pop(k) for k in list(overrides) if k in _TOP_FIELDS}
    text = text_fields(variant, ids)
    text.update(rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
                tie_word_embeddings=False)
    text.update(overrides)
    check_vocab(text, ids)
    vision = dict(_VISION[variant], num_hidden_layers=3, image_size=TILE, patch_size=PATCH,
                  layer_norm_eps=1e-6)
    vision.update(vision_overrides)
    cfg = {
        "text_config": transformers.Qwen2Config(**text),
        "vision_config": transformers.SiglipVisionConfig(**vision),
        "image_token_index": ids[IMAGE_TOKEN],
        "video_token_index": ids[VIDEO_TOKEN],
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "full",
        "vision_aspect_ratio": "anyres_max_2",
        "image_grid_pinpoints": PINPOINTS,
        "multimodal_projector_bias": True,
        "tie_word_embeddings": False,
    }
    cfg.update(top)
    return transformers.LlavaOnevisionConfig(**cfg)


def processor(tokenizer: Any, config: transformers.PretrainedConfig) -> Any:
    """SigLIP-style preprocessing to 28 x 28 tiles / frames, OneVision's token rules."""
    size = config.vision_config.image_size
    side = size // config.vision_config.patch_size
    image_processor = transformers.LlavaOnevisionImageProcessor(
        size={"height": size, "width": size}, image_grid_pinpoints=config.image_grid_pinpoints)
    video_processor = transformers.LlavaOnevisionVideoProcessor(
        size={"height": size, "width": size})
    return transformers.LlavaOnevisionProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
        num_image_tokens=side * side,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        vision_aspect_ratio=config.vision_aspect_ratio, chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN, video_token=VIDEO_TOKEN)


TINY = TinySpec(config=config, special_tokens=SPECIALS, chat_template=CHAT_TEMPLATE,
                auto_class="AutoModelForImageTextToText", processor=processor)
