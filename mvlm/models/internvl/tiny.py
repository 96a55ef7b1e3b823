"""The tiny InternVL its tests build: an InternViT (CLS token, learned positions, LayerNorm, layer
scale), the pixel-shuffle projector and a Qwen2 LLM with a ChatML template (the InternVL 2.5 / 3
layout; ``text_model_type`` set to ``Qwen3Config.model_type`` gives InternVL 3.5's Qwen3 LLM:
the same module tree, another text config).

Tiles are 56 x 56 px (16 patches of 14 px); pixel shuffle with ratio 0.5 leaves 2 x 2 features, so
a tile is 4 ``<IMG_CONTEXT>`` tokens. Dynamic tiling allows 1..6 tiles (plus the thumbnail when
there is more than one), so images of different sizes give different tile counts.
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

START_IMAGE = "<img>"
END_IMAGE = "</img>"
IMAGE_TOKEN = "<IMG_CONTEXT>"
VIDEO_TOKEN = "<video>"
SPECIALS = (START_IMAGE, END_IMAGE, IMAGE_TOKEN, VIDEO_TOKEN)
# The tokenizer attributes InternVLProcessor reads (tokenizer_config.json, as on the hub).
NAMED_TOKENS = {"start_image_token": START_IMAGE, "end_image_token": END_IMAGE,
                "context_image_token": IMAGE_TOKEN, "video_token": VIDEO_TOKEN}
TILE_SIZE = 56
PATCH_SIZE = 14
MAX_TILES = 6
# ImageNet mean / std, what InternVL normalises with
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)

# ChatML with InternVL's image part, written for this project: an image is one ``<IMG_CONTEXT>``
# and a newline (the processor expands it to ``<img>`` + the tiles' tokens + ``</img>``).
CHAT_TEMPLATE = chatml_template({IMAGE_PARTS: IMAGE_TOKEN + "\n"})

_VISION = {
    "default": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4},
    "indivisible": {"hidden_size": 48, "intermediate_size": 96, "num_attention_heads": 3},
    "bench": {"hidden_size": 512, "intermediate_size": 1376, "num_attention_heads": 8},
}
# Top-level InternVLConfig fields an override may set (the rest go to the text config).
_TOP_FIELDS = ("tie_word_embeddings", "image_token_id", "vision_feature_layer",
               "vision_feature_select_strategy", "projector_hidden_act", "downsample_ratio")
# The LLM's config class per ``text_model_type`` override (named by the classes' own model_type):
# Qwen2 (default; InternVL 2.5 / 3) or Qwen3 (InternVL 3.5).
_TEXT = {cls.model_type: cls for cls in (transformers.Qwen2Config, transformers.Qwen3Config)}
_DEFAULT_TEXT = transformers.Qwen2Config.model_type


def config(variant: str, ids: dict[str, int], overrides: dict[str, Any]
           ) -> transformers.PretrainedConfig:
    vision_overrides = overrides.pop("vision_config", None) or {}
    text_type = overrides.pop("text_model_type", _DEFAULT_TEXT)
    if text_type not in _TEXT:
        raise ValueError(f"text_model_type={text_type!r}: the tiny InternVL has {sorted(_TEXT)}")
    top = {k: overrides.pop(k) for k in list(overrides) if k in _TOP_FIELDS}
    text = text_fields(variant, ids)
    text.update(rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
                tie_word_embeddings=False)
    text.update(overrides)
    check_vocab(text, ids)
    vision = dict(_VISION[variant], num_hidden_layers=2, image_size=TILE_SIZE,
                  patch_size=PATCH_SIZE, layer_norm_eps=1e-6, hidden_act="gelu",
                  use_mean_pooling=True, norm_type="layer_norm", use_qk_norm=False,
                  attention_bias=True)
    vision.update(vision_overrides)
    cfg = {
        "text_config": _TEXT[text_type](**text),
        "vision_config": transformers.InternVLVisionConfig(**vision),
        "image_token_id": ids[IMAGE_TOKEN],
        "image_seq_length": tokens_per_tile(TILE_SIZE, PATCH_SIZE, 0.5),
        "downsample_ratio": 0.5,
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "default",
        "projector_hidden_act": "gelu",
        "tie_word_embeddings": False,
    }
    cfg.update(top)
    return transformers.InternVLConfig(**cfg)


def tokens_per_tile(tile: int, patch: int, downsample_ratio: float) -> int:
    """(tile / patch)^2 patches, times ratio^2 after the pixel shuffle."""
    return int((tile // patch) ** 2 * downsample_ratio ** 2)


def processor(tokenizer: Any, config: transformers.PretrainedConfig) -> Any:
    """GotOcr2 dynamic tiling (56 px tiles, 1..6 of them + thumbnail, ImageNet mean/std) and a
    tokenizer that names InternVL's image tokens, as the ``-hf`` hub checkpoints have."""
    size = config.vision_config.image_size[0]
    image_processor = transformers.GotOcr2ImageProcessor(
        size={"height": size, "width": size}, crop_to_patches=True, min_patches=1,
        max_patches=MAX_TILES, image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD))
    named = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend_tokenizer, eos_token=tokenizer.eos_token,
        pad_token=tokenizer.pad_token, unk_token=None, bos_token=None,
        additional_special_tokens=["<|im_start|>", *SPECIALS],
        model_max_length=tokenizer.model_max_length, padding_side="right",
        clean_up_tokenization_spaces=False, chat_template=CHAT_TEMPLATE,
        extra_special_tokens=dict(NAMED_TOKENS))
    # InternVLProcessor requires a video processor; mvlm's template takes images only
    video_processor = transformers.InternVLVideoProcessor(
        size={"height": size, "width": size}, image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD))
    return transformers.InternVLProcessor(
        image_processor=image_processor, tokenizer=named, video_processor=video_processor,
        image_seq_length=config.image_seq_length, chat_template=CHAT_TEMPLATE)


TINY = TinySpec(config=config, special_tokens=SPECIALS, chat_template=CHAT_TEMPLATE,
                auto_class="AutoModelForImageTextToText", processor=processor)
