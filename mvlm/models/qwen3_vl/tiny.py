"""The tiny Qwen3-VL its tests build: a 4-layer Qwen3 decoder (q/k-norm, untied) with
interleaved mRoPE, and a 2-block ViT (16 px patches, a 4x4 learned position grid) whose two
blocks both feed DeepStack, so levels land on decoder layers 0 and 1 -- the first stage at PP2.
The processor is HF's Qwen3VLProcessor with the small pixel budget."""
from __future__ import annotations

from typing import Any

import transformers

from mvlm.models.qwen2_vl.tiny import VISION_SPECIALS, image_processor
from mvlm.testing.tiny_models import (
    CHAT_TEMPLATE,
    TinySpec,
    check_vocab,
    mrope_section_for,
    processor_sizes,
    text_fields,
    vision_sizes,
)

_TOP_FIELDS = ("tie_word_embeddings", "image_token_id", "video_token_id",
               "vision_start_token_id", "vision_end_token_id")
NUM_LAYERS = 4


def text_config(variant: str, ids: dict[str, int], overrides: dict[str, Any],
                moe: bool = False) -> dict[str, Any]:
    text = text_fields(variant, ids, moe=moe)
    text["num_hidden_layers"] = max(NUM_LAYERS, text["num_hidden_layers"])
    text["attention_bias"] = False
    text.update(overrides)
    text.setdefault("head_dim", text["hidden_size"] // text["num_attention_heads"])
    text.setdefault("rope_parameters", {
        "rope_type": "default", "rope_theta": 1_000_000.0,
        "mrope_section": mrope_section_for(text["head_dim"]), "mrope_interleaved": True})
    check_vocab(text, ids)
    return text


def vision_config(variant: str, text: dict[str, Any]) -> dict[str, Any]:
    v = vision_sizes(variant)
    return {
        "depth": v["depth"],
        "hidden_size": v["width"],
        "num_heads": v["num_heads"],
        "intermediate_size": v["intermediate"],
        "out_hidden_size": text["hidden_size"],
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "in_channels": 3,
        "num_position_embeddings": 16,
        "deepstack_visual_indexes": list(range(min(2, v["depth"]))),
    }


def vl_config(config_cls: type, variant: str, ids: dict[str, int], overrides: dict[str, Any],
              moe: bool = False) -> transformers.PretrainedConfig:
    vision_overrides = overrides.pop("vision_config", None) or {}
    top = {k: overrides.pop(k) for k in list(overrides) if k in _TOP_FIELDS}
    text = text_config(variant, ids, overrides, moe=moe)
    vision = vision_config(variant, text)
    vision.update(vision_overrides)
    cfg = {
        "text_config": text,
        "vision_config": vision,
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "tie_word_embeddings": False,
    }
    cfg.update(top)
    return config_cls(**cfg)


def config(variant: str, ids: dict[str, int], overrides: dict[str, Any]
           ) -> transformers.PretrainedConfig:
    return vl_config(transformers.Qwen3VLConfig, variant, ids, overrides)


def processor(tokenizer: Any, config: transformers.PretrainedConfig) -> Any:
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    common = processor_sizes(config)
    video = Qwen3VLVideoProcessor(**common, cap_pixels_per_frame=True)
    return transformers.Qwen3VLProcessor(image_processor=image_processor(common),
                                         tokenizer=tokenizer, video_processor=video,
                                         chat_template=CHAT_TEMPLATE)


TINY = TinySpec(config=config, special_tokens=VISION_SPECIALS,
                auto_class="AutoModelForImageTextToText", processor=processor)
