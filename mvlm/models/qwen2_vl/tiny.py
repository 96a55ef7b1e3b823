"""The tiny Qwen2-VL its tests build, and the processor saved with it.

Qwen2-VL names the ViT width ``embed_dim`` (its ``hidden_size`` is the merger's output = the
text hidden size). ``vl_config`` is shared with Qwen2.5-VL, which passes its own vision fields.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import transformers

from mvlm.testing.tiny_models import (
    CHAT_TEMPLATE,
    TinySpec,
    check_vocab,
    mrope_section_for,
    processor_sizes,
    text_fields,
    vision_sizes,
)

VISION_SPECIALS = (
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Fields of the top-level config (the rest of the overrides go to the text config).
_TOP_FIELDS = ("tie_word_embeddings", "image_token_id", "video_token_id",
               "vision_start_token_id", "vision_end_token_id")


def vl_config(config_cls: type, vision_fields: Callable[[dict, dict], dict], variant: str,
              ids: dict[str, int], overrides: dict[str, Any]) -> transformers.PretrainedConfig:
    """A Qwen-VL config: the Qwen2 text config with mRoPE, the family's vision fields
    (``vision_fields(sizes, text)``), the vision token ids of the tokenizer."""
    vision_overrides = overrides.pop("vision_config", None) or {}
    top = {k: overrides.pop(k) for k in list(overrides) if k in _TOP_FIELDS}
    text = text_fields(variant, ids)
    text.update(overrides)
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    if "rope_parameters" not in overrides:
        text["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": 1_000_000.0,
            "mrope_section": mrope_section_for(head_dim),
        }
    check_vocab(text, ids)
    vision = vision_fields(vision_sizes(variant), text)
    vision.update(vision_overrides)
    cfg = {
        "text_config": text,
        "vision_config": vision,
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "tie_word_embeddings": False,
        "bos_token_id": ids["bos_token_id"],
        "eos_token_id": ids["eos_token_id"],
        "pad_token_id": ids["pad_token_id"],
    }
    cfg.update(top)
    return config_cls(**cfg)


def _vision_fields(v: dict[str, Any], text: dict[str, Any]) -> dict[str, Any]:
    return {
        "depth": v["depth"],
        "embed_dim": v["width"],
        "num_heads": v["num_heads"],
        "mlp_ratio": v["intermediate"] // v["width"],
        "hidden_size": text["hidden_size"],
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "in_channels": 3,
    }


def config(variant: str, ids: dict[str, int], overrides: dict[str, Any]
           ) -> transformers.PretrainedConfig:
    return vl_config(transformers.Qwen2VLConfig, _vision_fields, variant, ids, overrides)


def image_processor(kwargs: dict[str, Any]) -> Any:
    """The torchvision ("fast") image processor; the PIL one if the fast one cannot be built."""
    try:
        return transformers.Qwen2VLImageProcessor(**kwargs)
    except (ImportError, RuntimeError, ValueError):  # pragma: no cover - depends on torchvision
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil,
        )

        return Qwen2VLImageProcessorPil(**kwargs)


def vl_processor(processor_cls: type, tokenizer: Any, config: transformers.PretrainedConfig
                 ) -> Any:
    """A Qwen-VL processor with the small pixel budget, so test images give tiny grids."""
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    common = processor_sizes(config)
    # cap_pixels_per_frame=True: the qwen-vl-utils behaviour (and HF's announced default); being
    # explicit also silences transformers' per-call deprecation warning.
    video_processor = Qwen2VLVideoProcessor(**common, cap_pixels_per_frame=True)
    return processor_cls(image_processor=image_processor(common), tokenizer=tokenizer,
                         video_processor=video_processor, chat_template=CHAT_TEMPLATE)


def processor(tokenizer: Any, config: transformers.PretrainedConfig) -> Any:
    return vl_processor(transformers.Qwen2VLProcessor, tokenizer, config)


TINY = TinySpec(config=config, special_tokens=VISION_SPECIALS,
                auto_class="AutoModelForImageTextToText", processor=processor)
