"""Qwen2 / Qwen2.5 weights: the Llama-style decoder table, nothing else (hub layout
``model.layers.*``, ``model.embed_tokens``, ``model.norm``, ``lm_head``)."""
from __future__ import annotations

from transformers import PretrainedConfig

from mvlm.convert.mapping import Mapping
from mvlm.models.decoder_table import decoder_table
from mvlm.models.gpt import TextArch


def mappings(hf_config: PretrainedConfig, arch: TextArch) -> list[Mapping]:
    return decoder_table(arch)
