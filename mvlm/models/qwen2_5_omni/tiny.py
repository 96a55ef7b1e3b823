"""The tiny Qwen2.5-Omni thinker its tests build, and the processor saved with it.

Qwen2.5-Omni names its media tokens differently from Qwen2.5-VL (``<|IMAGE|>``, ``<|VIDEO|>``,
``<|AUDIO|>``, ``<|vision_bos|>``/``<|vision_eos|>``, ``<|audio_bos|>``/``<|audio_eos|>``) and its
processor reads them off the tokenizer's named special tokens, so the tokenizer carries those
names. The audio feature extractor is Whisper's with few mel bins and a 2-second window (200
frames, padded to that length as the Omni processor does), so a test wav gives a few audio tokens.
"""
from __future__ import annotations

from typing import Any

import transformers

from mvlm.models.qwen2_vl.tiny import image_processor
from mvlm.testing.tiny_models import (
    IMAGE_PARTS,
    TinySpec,
    chatml_template,
    check_vocab,
    mrope_section_for,
    processor_sizes,
    text_fields,
    vision_sizes,
)

OMNI_SPECIALS = (
    "<|vision_bos|>",
    "<|vision_eos|>",
    "<|vision_pad|>",
    "<|IMAGE|>",
    "<|VIDEO|>",
    "<|AUDIO|>",
    "<|audio_bos|>",
    "<|audio_eos|>",
)
# the processor's names for them (tokenizer.image_token etc.)
NAMED_TOKENS = {
    "image_token": "<|IMAGE|>",
    "video_token": "<|VIDEO|>",
    "audio_token": "<|AUDIO|>",
    "vision_bos_token": "<|vision_bos|>",
    "vision_eos_token": "<|vision_eos|>",
    "audio_bos_token": "<|audio_bos|>",
    "audio_eos_token": "<|audio_eos|>",
}
NUM_MEL_BINS = 16
CHUNK_SECONDS = 2  # feature-extractor window: every audio is padded to 2 s = 200 frames
SAMPLING_RATE = 16000

# A Qwen2.5-Omni style chat template, written for this project: image / video / audio parts
# become <|vision_bos|><|IMAGE|><|vision_eos|>, <|vision_bos|><|VIDEO|><|vision_eos|>,
# <|audio_bos|><|AUDIO|><|audio_eos|> (the processor expands the single pad to the real count).
CHAT_TEMPLATE = chatml_template({
    IMAGE_PARTS: "<|vision_bos|><|IMAGE|><|vision_eos|>",
    ("video",): "<|vision_bos|><|VIDEO|><|vision_eos|>",
    ("audio", "audio_url"): "<|audio_bos|><|AUDIO|><|audio_eos|>",
})


def config(variant: str, ids: dict[str, int], overrides: dict[str, Any]
           ) -> transformers.PretrainedConfig:
    """Qwen2_5OmniThinkerConfig: the shared tiny text sizes with mRoPE, Qwen2.5-VL-style vision
    fields, a 2-layer audio encoder whose output width is the text hidden size."""
    vision_overrides = overrides.pop("vision_config", None) or {}
    audio_overrides = overrides.pop("audio_config", None) or {}
    tie = overrides.pop("tie_word_embeddings", False)
    text = text_fields(variant, ids)
    text.update(overrides)
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    text.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": 1_000_000.0,
                                        "mrope_section": mrope_section_for(head_dim)})
    text["tie_word_embeddings"] = tie
    check_vocab(text, ids)
    v = vision_sizes(variant)
    vision = {"depth": v["depth"], "hidden_size": v["width"], "num_heads": v["num_heads"],
              "intermediate_size": v["intermediate"], "out_hidden_size": text["hidden_size"],
              "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
              "in_channels": 3, "window_size": 56, "fullatt_block_indexes": list(v["fullatt"])}
    vision.update(vision_overrides)
    audio = {"num_mel_bins": NUM_MEL_BINS, "encoder_layers": 2, "encoder_attention_heads": 2,
             "encoder_ffn_dim": 64, "d_model": 32, "output_dim": text["hidden_size"],
             # chunks of 2 * n_window = 40 mel frames: a 1 s test audio spans several chunks
             "n_window": 20, "max_source_positions": 100}
    audio.update(audio_overrides)
    return transformers.Qwen2_5OmniThinkerConfig(
        text_config=text, vision_config=vision, audio_config=audio,
        audio_token_index=ids["<|AUDIO|>"], image_token_index=ids["<|IMAGE|>"],
        video_token_index=ids["<|VIDEO|>"], audio_start_token_id=ids["<|audio_bos|>"],
        audio_end_token_id=ids["<|audio_eos|>"], vision_start_token_id=ids["<|vision_bos|>"],
        vision_end_token_id=ids["<|vision_eos|>"], tie_word_embeddings=tie,
        bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"],
        pad_token_id=ids["pad_token_id"])


def processor(tokenizer: Any, config: transformers.PretrainedConfig) -> Any:
    """Qwen2_5OmniProcessor: the small-pixel Qwen-VL image/video processors, a Whisper feature
    extractor with the audio tower's mel bins, the tokenizer with the named media tokens."""
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    tokenizer._set_model_specific_special_tokens(special_tokens=dict(NAMED_TOKENS))
    common = processor_sizes(config)
    features = transformers.WhisperFeatureExtractor(
        feature_size=config.audio_config.num_mel_bins, sampling_rate=SAMPLING_RATE,
        hop_length=160, chunk_length=CHUNK_SECONDS, n_fft=400, return_attention_mask=True)
    return transformers.Qwen2_5OmniProcessor(
        image_processor=image_processor(common),
        video_processor=Qwen2VLVideoProcessor(**common, cap_pixels_per_frame=True),
        feature_extractor=features, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


TINY = TinySpec(config=config, special_tokens=OMNI_SPECIALS,
                auto_class="AutoModelForImageTextToText", processor=processor,
                chat_template=CHAT_TEMPLATE)
