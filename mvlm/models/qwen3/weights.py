"""Qwen3 weights: the Llama-style decoder table with q/k-norm rows (``self_attn.q_norm`` /
``k_norm``, one [head_dim] weight shared by the heads); hub layout ``model.*`` / ``lm_head``."""
from __future__ import annotations

from transformers import PretrainedConfig

from mvlm.convert.mapping import Mapping
from mvlm.models.decoder_table import decoder_table
from mvlm.models.gpt import TextArch


def mappings(hf_config: PretrainedConfig, arch: TextArch) -> list[Mapping]:
    return decoder_table(arch)
