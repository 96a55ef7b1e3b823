"""Qwen2-VL / Qwen2.5-VL weights, hub layout (also what transformers 5 ``save_pretrained``
writes): the Qwen2 decoder under ``model.layers.*`` / ``lm_head.weight``, and the vision tower
with its merger under ``visual.*``, kept whole (the HF module runs as is, replicated per TP rank).
"""
from __future__ import annotations

from transformers import PretrainedConfig

from mvlm.convert.mapping import Mapping, Replicated
from mvlm.models.decoder_table import decoder_table
from mvlm.models.gpt import TextArch


def mappings(hf_config: PretrainedConfig, arch: TextArch) -> list[Mapping]:
    return decoder_table(arch) + [Replicated("vision_model.tower.{*}", "visual.{*}")]
