"""Qwen2.5-Omni thinker weights, hub layout (what transformers 5 ``save_pretrained`` of
``Qwen2_5OmniThinkerForConditionalGeneration`` writes): the Qwen2 decoder under
``model.layers.*`` / ``model.embed_tokens`` / ``model.norm`` / ``lm_head``, the Qwen2.5-VL-style
vision encoder under ``visual.*`` and the Whisper-style audio encoder (with its projection to the
text width) under ``audio_tower.*``. Both towers are the HF modules, kept whole (replicated per
TP rank on the first pipeline stage), so their parameters map 1:1.
"""
from __future__ import annotations

from transformers import PretrainedConfig

from mvlm.convert.mapping import Mapping, Replicated
from mvlm.models.decoder_table import decoder_table
from mvlm.models.gpt import TextArch


def mappings(hf_config: PretrainedConfig, arch: TextArch) -> list[Mapping]:
    return decoder_table(arch) + [
        Replicated("vision_model.visual.{*}", "visual.{*}"),
        Replicated("vision_model.audio_tower.{*}", "audio_tower.{*}"),
    ]
