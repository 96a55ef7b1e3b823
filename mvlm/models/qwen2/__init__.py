"""Qwen2 / Qwen2.5 text models (also the language model of Qwen2-VL and Qwen2.5-VL).

Dense Llama-style decoder with QKV bias, RMSNorm, SwiGLU, plain RoPE; ChatML template with a
default system prompt. Files: ``weights.py`` (mapping table), ``template.py`` (ChatML),
``tiny.py`` (test config).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from mvlm.models.registry import FamilySpec, register

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from mvlm.models.gpt import TextArch


def rope(cfg: PretrainedConfig) -> tuple[float, list[int] | None]:
    """(rope theta, mRoPE section or None) from either spelling transformers has used."""
    rp = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    theta = rp.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    rtype = rp.get("rope_type", rp.get("type", "default"))
    if rtype not in ("default", "mrope"):
        raise ValueError(f"rope_type {rtype!r} is not supported yet (only default RoPE/mRoPE)")
    return float(theta), rp.get("mrope_section")


def qwen2_text_arch(cfg: PretrainedConfig) -> TextArch:
    """The Qwen2 decoder read off a text config (shared by the Qwen-VL and Qwen3-MoE families)."""
    from mvlm.models.gpt import TextArch

    theta, mrope = rope(cfg)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return TextArch(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_hidden_layers,
        num_heads=cfg.num_attention_heads,
        num_kv_heads=cfg.num_key_value_heads,
        head_dim=head_dim,
        ffn_hidden_size=cfg.intermediate_size,
        norm_eps=cfg.rms_norm_eps,
        rope_theta=theta,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        qkv_bias=True,
        mrope_section=mrope,
    )


def _arch(cfg: PretrainedConfig) -> TextArch:
    if getattr(cfg, "use_sliding_window", False):
        raise ValueError("Qwen2 sliding-window attention is not supported: set "
                         "use_sliding_window=false in config.json")
    return qwen2_text_arch(cfg)


QWEN2 = register(FamilySpec(
    name="qwen2",
    model_types=("qwen2",),
    hf_model_class="Qwen2ForCausalLM",
    text_arch=_arch,
    weights="mvlm.models.qwen2.weights:mappings",
    template="mvlm.models.qwen2.template:Qwen2Template",
    tiny="mvlm.models.qwen2.tiny:TINY",
))
