"""Gemma weights: the Llama decoder table (norm weights are stored zero-centred, ``w`` for a scale
of ``1 + w``, and load as they are); tied embeddings, so no ``lm_head`` on disk."""
from __future__ import annotations

from transformers import PretrainedConfig

from mvlm.convert.mapping import Mapping
from mvlm.models.decoder_table import decoder_table
from mvlm.models.gpt import TextArch


def mappings(hf_config: PretrainedConfig, arch: TextArch) -> list[Mapping]:
    return decoder_table(arch)
