"""Gemma (1) text models: the Llama decoder with zero-centred RMSNorm (``1 + w``, in fp32),
gated ``gelu_pytorch_tanh`` (GeGLU), embeddings scaled by sqrt(hidden_size) and tied to the LM
head; ``<start_of_turn>`` chat template. Gemma 2/3 (logit soft-capping, sliding-window layers,
extra norms) are other model types and not covered. Files: ``weights.py``, ``template.py``,
``tiny.py``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from mvlm.models.registry import FamilySpec, register

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from mvlm.models.gpt import TextArch


def gemma_text_arch(cfg: PretrainedConfig) -> TextArch:
    from mvlm.models.hf_text import llama_style_arch

    arch = llama_style_arch(cfg, norm_zero_centered_gamma=True)
    arch.embedding_multiplier = cfg.hidden_size ** 0.5
    return arch


GEMMA = register(FamilySpec(
    name="gemma",
    model_types=("gemma",),
    hf_model_class="GemmaForCausalLM",
    text_arch=gemma_text_arch,
    weights="mvlm.models.gemma.weights:mappings",
    template="mvlm.models.gemma.template:GemmaTemplate",
    tiny="mvlm.models.gemma.tiny:TINY",
))
