"""The tiny LLaVA-NeXT its tests build: LLaVA's tiny CLIP ViT and Qwen2 LLM (``mvlm.models.llava.
tiny``) with any-resolution tiling. Tiles are 28 x 28 (4 x 4 patches of 7 px, CLS dropped: 16
tokens a tile) and the pinpoints ``28x56, 56x28, 56x56`` give 2 or 4 tiles plus the base tile,
so non-square images exercise the unpad step and the newline column.
"""
from __future__ import annotations

from typing import Any

import transformers

from mvlm.models.llava import tiny as llava_tiny
from mvlm.testing.tiny_models import TinySpec

TILE = 28
PATCH = 7
PINPOINTS = [[28, 56], [56, 28], [56, 56]]


def config(variant: str, ids: dict[str, int], overrides: dict[str, Any]
           ) -> transformers.PretrainedConfig:
    vision = dict(overrides.pop("vision_config", None) or {})
    vision = {"image_size": TILE, "patch_size": PATCH, **vision}
    pinpoints = overrides.pop("image_grid_pinpoints", PINPOINTS)
    base = llava_tiny.config(variant, ids, {**overrides, "vision_config": vision})
    return transformers.LlavaNextConfig(
        text_config=base.text_config, vision_config=base.vision_config,
        image_grid_pinpoints=pinpoints,
        **{k: getattr(base, k) for k in ("image_token_id", "vision_feature_layer",
                                         "vision_feature_select_strategy", "projector_hidden_act",
                                         "multimodal_projector_bias", "tie_word_embeddings")})


def processor(tokenizer: Any, config: transformers.PretrainedConfig) -> Any:
    """CLIP preprocessing per tile (shortest edge -> 28, crop 28 x 28) with NeXT's tiling."""
    size = config.vision_config.image_size
    image_processor = transformers.LlavaNextImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        image_grid_pinpoints=config.image_grid_pinpoints)
    return transformers.LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1, chat_template=llava_tiny.CHAT_TEMPLATE,
        image_token=llava_tiny.IMAGE_TOKEN)


TINY = TinySpec(config=config, special_tokens=llava_tiny.SPECIALS,
                chat_template=llava_tiny.CHAT_TEMPLATE,
                auto_class="AutoModelForImageTextToText", processor=processor)
