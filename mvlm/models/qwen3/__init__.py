"""Qwen3 dense text models: Llama-style decoder with q/k-norm (RMSNorm per head before RoPE), no
QKV bias (``attention_bias`` false), SwiGLU, RoPE (default or YaRN); ChatML without a default
system prompt and with Qwen3's hybrid-thinking empty think block. Also the language model of
Qwen3-based VLMs. Files: ``weights.py``, ``template.py``, ``tiny.py``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from mvlm.models.registry import FamilySpec, register

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from mvlm.models.gpt import TextArch


def qwen3_text_arch(cfg: PretrainedConfig) -> TextArch:
    """The Qwen3 decoder of a text config: ``attention_bias`` covers q/k/v/o like Llama's."""
    from mvlm.models.hf_text import llama_style_arch

    return llama_style_arch(cfg, qk_layernorm=True)


QWEN3 = register(FamilySpec(
    name="qwen3",
    model_types=("qwen3",),
    hf_model_class="Qwen3ForCausalLM",
    text_arch=qwen3_text_arch,
    weights="mvlm.models.qwen3.weights:mappings",
    template="mvlm.models.qwen3.template:Qwen3Template",
    tiny="mvlm.models.qwen3.tiny:TINY",
))
