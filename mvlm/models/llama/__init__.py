"""Llama 2 / 3.x text models (also the LLM of LLaVA-style VLMs): RMSNorm, SwiGLU, GQA, RoPE with
Llama 3.1's ``llama3`` frequency scaling (or linear / YaRN), ``attention_bias`` on q/k/v/o and
``mlp_bias`` on the MLP as separate switches; Llama 3 header-style chat template.
Files: ``weights.py``, ``template.py``, ``tiny.py``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from mvlm.models.registry import FamilySpec, register

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from mvlm.models.gpt import TextArch


def llama_text_arch(cfg: PretrainedConfig) -> TextArch:
    from mvlm.models.gpt import ArchError
    from mvlm.models.hf_text import llama_style_arch

    if getattr(cfg, "pretraining_tp", 1) not in (None, 1):
        raise ArchError(f"pretraining_tp={cfg.pretraining_tp}: set it to 1 in config.json (the "
                        "sliced matmuls it asks for are not reproduced)")
    return llama_style_arch(cfg)


LLAMA = register(FamilySpec(
    name="llama",
    model_types=("llama",),
    hf_model_class="LlamaForCausalLM",
    text_arch=llama_text_arch,
    weights="mvlm.models.llama.weights:mappings",
    template="mvlm.models.llama.template:Llama3Template",
    tiny="mvlm.models.llama.tiny:TINY",
))
