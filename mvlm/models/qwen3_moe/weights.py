"""Qwen3-MoE weights: the decoder table with q/k norms and routed experts
(``mlp.gate`` = router, ``mlp.experts.{E}.{gate,up,down}_proj``); the table follows ``arch``."""
from __future__ import annotations

from transformers import PretrainedConfig

from mvlm.convert.mapping import Mapping
from mvlm.models.decoder_table import decoder_table
from mvlm.models.gpt import TextArch


def mappings(hf_config: PretrainedConfig, arch: TextArch) -> list[Mapping]:
    return decoder_table(arch)
