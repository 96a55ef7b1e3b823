"""HF text config -> ``TextArch`` for Llama-style decoders (Llama, Mistral, Qwen3, ...).

Why this exists: most decoder-only families differ only in which options they switch on (biases,
q/k-norm, norm type, activation, RoPE variant) and in the HF field names that say so. A family
reads its config through :func:`llama_style_arch`, passing what its HF modeling code fixes, so a
new Llama-like family needs no new model code. Options mvlm cannot reproduce exactly raise
``ArchError`` naming the HF field and what to change.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from mvlm.models.gpt import ArchError, TextArch
from mvlm.models.rope import rope_from_hf

if TYPE_CHECKING:
    from transformers import PretrainedConfig


def refuse_sliding_window(cfg: PretrainedConfig) -> None:
    """Sliding-window attention is not built (the SDPA core attention is full-causal); a window
    at least as long as the context is a no-op and is accepted."""
    types = getattr(cfg, "layer_types", None) or ()
    if "sliding_attention" in types:
        raise ArchError(
            "layer_types contains 'sliding_attention' (use_sliding_window=true): sliding-window "
            "attention is not supported; set use_sliding_window=false in config.json")
    window = getattr(cfg, "sliding_window", None)
    use = getattr(cfg, "use_sliding_window", True)
    if use and window is not None and window < cfg.max_position_embeddings:
        raise ArchError(
            f"sliding_window={window} < max_position_embeddings={cfg.max_position_embeddings}: "
            "sliding-window attention is not supported; set \"sliding_window\": null in "
            "config.json (exact for sequences up to the window)")


def llama_style_arch(cfg: PretrainedConfig, *, qk_layernorm: bool = False,
                     normalization: str = "RMSNorm", norm_eps_field: str = "rms_norm_eps",
                     norm_zero_centered_gamma: bool = False, gated_mlp: bool = True,
                     act_field: str = "hidden_act", qkv_bias: bool | None = None,
                     attn_out_bias: bool | None = None, mlp_bias: bool | None = None,
                     partial_rotary: bool = False) -> TextArch:
    """``TextArch`` of a Llama-style text config.

    Biases default to Llama's fields: ``attention_bias`` covers q/k/v and o_proj, ``mlp_bias``
    every MLP projection; a family whose HF code decides otherwise passes them explicitly.
    ``partial_rotary``: the family's HF code honours ``partial_rotary_factor`` (Nemotron,
    StableLM); Llama's rotates whole heads whatever the config says, and so does mvlm then."""
    refuse_sliding_window(cfg)
    theta, scaling, partial, mrope = rope_from_hf(cfg)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attention_bias = bool(getattr(cfg, "attention_bias", False))
    return TextArch(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_hidden_layers,
        num_heads=cfg.num_attention_heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        head_dim=head_dim,
        ffn_hidden_size=cfg.intermediate_size,
        norm_eps=float(getattr(cfg, norm_eps_field)),
        rope_theta=theta,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        qkv_bias=attention_bias if qkv_bias is None else qkv_bias,
        attn_out_bias=attention_bias if attn_out_bias is None else attn_out_bias,
        mlp_bias=bool(getattr(cfg, "mlp_bias", False)) if mlp_bias is None else mlp_bias,
        qk_layernorm=qk_layernorm,
        mrope_section=mrope,
        normalization=normalization,
        norm_zero_centered_gamma=norm_zero_centered_gamma,
        activation=getattr(cfg, act_field),
        gated_mlp=gated_mlp,
        rotary_percent=partial if partial_rotary else 1.0,
        rope_scaling=scaling,
    )
