"""Qwen3-VL weights, hub layout (what the Qwen3-VL hub checkpoints and transformers 5
``save_pretrained`` both write: the module tree): the Qwen3 decoder under
``model.language_model.*`` (q/k-norms, no biases), ``lm_head.weight`` unless tied, and the vision
tower -- ViT, merger and the DeepStack mergers (``deepstack_merger_list.*``) -- under
``model.visual.*``, kept whole (the HF module runs as is, replicated per TP rank)."""
from __future__ import annotations

from transformers import PretrainedConfig

from mvlm.convert.mapping import Mapping, Replicated
from mvlm.models.decoder_table import decoder_table
from mvlm.models.gpt import TextArch

LLM_PREFIX = "model.language_model."
TOWER_PREFIX = "model.visual."


def mappings(hf_config: PretrainedConfig, arch: TextArch) -> list[Mapping]:
    return decoder_table(arch, prefix=LLM_PREFIX) + [
        Replicated("vision_model.tower.{*}", TOWER_PREFIX + "{*}")]
