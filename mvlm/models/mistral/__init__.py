"""Mistral text models (7B v0.2/v0.3, Nemo-style configs): the Llama decoder without biases;
sliding-window attention only when the window covers the whole context (v0.2+ set it null);
``[INST]`` chat template. Files: ``weights.py``, ``template.py``, ``tiny.py``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from mvlm.models.registry import FamilySpec, register

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from mvlm.models.gpt import TextArch


def mistral_text_arch(cfg: PretrainedConfig) -> TextArch:
    from mvlm.models.hf_text import llama_style_arch

    # MistralAttention / MistralMLP are built without biases whatever the config holds
    return llama_style_arch(cfg, qkv_bias=False, attn_out_bias=False, mlp_bias=False)


MISTRAL = register(FamilySpec(
    name="mistral",
    model_types=("mistral",),
    hf_model_class="MistralForCausalLM",
    text_arch=mistral_text_arch,
    weights="mvlm.models.mistral.weights:mappings",
    template="mvlm.models.mistral.template:MistralTemplate",
    tiny="mvlm.models.mistral.tiny:TINY",
))
