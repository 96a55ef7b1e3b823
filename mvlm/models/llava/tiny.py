"""The tiny LLaVA its tests build: a CLIP ViT (CLS token, learned positions, pre-LayerNorm), the
2-layer GELU projector and a Qwen2 LLM with a ChatML template (the LLaVA-Interleave layout;
``text_model_type="llama"`` gives LLaVA-1.5's Llama LLM: the same module tree, another text
config).

The ViT sees 56 x 56 images (16 patches of 14 px): features come from ``vision_feature_layer=-2``
with the CLS token dropped (``"default"``), so each image is 16 ``<image>`` tokens. Three ViT
layers so the selected layer is not the first nor the last (the last one runs but is unused, as
in LLaVA-1.5).
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
SPECIALS = (IMAGE_TOKEN,)
IMAGE_SIZE = 56
PATCH_SIZE = 14

# ChatML with LLaVA's image token, written for this project: an image part is one ``<image>``
# (the processor expands it to the ViT's patch count).
CHAT_TEMPLATE = chatml_template({IMAGE_PARTS: IMAGE_TOKEN})

_VISION = {
    "default": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4},
    "indivisible": {"hidden_size": 48, "intermediate_size": 96, "num_attention_heads": 3},
    "bench": {"hidden_size": 512, "intermediate_size": 1376, "num_attention_heads": 8},
}
# Top-level LlavaConfig fields an override may set (the rest go to the text config).
_TOP_FIELDS = ("tie_word_embeddings", "image_token_id", "vision_feature_layer",
               "vision_feature_select_strategy", "projector_hidden_act",
               "multimodal_projector_bias")


# The LLM's config class per ``text_model_type`` override: Qwen2 (default; LLaVA-Interleave) or
# Llama (LLaVA-1.5's Vicuna), with their RoPE bases.
_TEXT = {"qwen2": (transformers.Qwen2Config, 1_000_000.0),
         "llama": (transformers.LlamaConfig, 10_000.0)}


def config(variant: str, ids: dict[str, int], overrides: dict[str, Any]
           ) -> transformers.PretrainedConfig:
    vision_overrides = overrides.pop("vision_config", None) or {}
    text_type = overrides.pop("text_model_type", "qwen2")
    if text_type not in _TEXT:
        raise ValueError(f"text_model_type={text_type!r}: the tiny LLaVA has {sorted(_TEXT)}")
    text_cls, theta = _TEXT[text_type]
    top = {k: overrides.pop(k) for k in list(overrides) if k in _TOP_FIELDS}
    text = text_fields(variant, ids)
    text.update(rope_parameters={"rope_type": "default", "rope_theta": theta},
                tie_word_embeddings=False)
    text.update(overrides)
    check_vocab(text, ids)
    vision = dict(_VISION[variant], num_hidden_layers=3, image_size=IMAGE_SIZE,
                  patch_size=PATCH_SIZE, projection_dim=32, layer_norm_eps=1e-5,
                  hidden_act="quick_gelu")
    vision.update(vision_overrides)
    cfg = {
        "text_config": text_cls(**text),
        "vision_config": transformers.CLIPVisionConfig(**vision),
        "image_token_id": ids[IMAGE_TOKEN],
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True,
        "tie_word_embeddings": False,
    }
    cfg.update(top)
    return transformers.LlavaConfig(**cfg)


def processor(tokenizer: Any, config: transformers.PretrainedConfig) -> Any:
    """CLIP preprocessing (shortest edge -> 56, center crop 56 x 56, CLIP mean/std) and
    LLaVA's token count rule (patches + CLS, minus CLS for the ``default`` strategy)."""
    size = config.vision_config.image_size
    image_processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return transformers.LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE, image_token=IMAGE_TOKEN)


TINY = TinySpec(config=config, special_tokens=SPECIALS, chat_template=CHAT_TEMPLATE,
                auto_class="AutoModelForImageTextToText", processor=processor,
                # the demo's 112 px shapes need more than the test tower's 56 px input
                demo_overrides={"vision_config": {"image_size": 112}})
