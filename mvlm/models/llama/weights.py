"""Llama weights: the decoder table as is (hub layout ``model.*`` / ``lm_head``), with bias rows
when ``attention_bias`` (q/k/v/o) or ``mlp_bias`` (gate/up/down) is set."""
from __future__ import annotations

from transformers import PretrainedConfig

from mvlm.convert.mapping import Mapping
from mvlm.models.decoder_table import decoder_table
from mvlm.models.gpt import TextArch


def mappings(hf_config: PretrainedConfig, arch: TextArch) -> list[Mapping]:
    return decoder_table(arch)
