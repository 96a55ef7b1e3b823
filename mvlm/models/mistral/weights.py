"""Mistral weights: the Llama decoder table as is (``model.*`` / ``lm_head``, no biases)."""
from __future__ import annotations

from transformers import PretrainedConfig

from mvlm.convert.mapping import Mapping
from mvlm.models.decoder_table import decoder_table
from mvlm.models.gpt import TextArch


def mappings(hf_config: PretrainedConfig, arch: TextArch) -> list[Mapping]:
    return decoder_table(arch)
