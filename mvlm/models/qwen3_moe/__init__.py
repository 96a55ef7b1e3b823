"""Qwen3-MoE text models: QK-norm, no QKV bias, routed experts (softmax, top-k, optional
renormalisation), no shared expert; ChatML template without a default system prompt and with
Qwen3's hybrid-thinking empty think block. Files: ``weights.py``, ``template.py``, ``tiny.py``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from mvlm.models.qwen2 import qwen2_text_arch
from mvlm.models.registry import FamilySpec, register

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from mvlm.models.gpt import TextArch


def _arch(cfg: PretrainedConfig) -> TextArch:
    arch = qwen2_text_arch(cfg)
    if getattr(cfg, "mlp_only_layers", None):
        raise ValueError("Qwen3-MoE with mlp_only_layers (dense layers among MoE layers) is not "
                         "supported yet: every layer must be sparse")
    if getattr(cfg, "decoder_sparse_step", 1) != 1:
        raise ValueError("Qwen3-MoE with decoder_sparse_step != 1 is not supported yet")
    arch.qkv_bias = bool(getattr(cfg, "attention_bias", False))
    arch.qk_layernorm = True
    arch.num_experts = getattr(cfg, "num_experts", None) or cfg.num_local_experts
    arch.moe_topk = cfg.num_experts_per_tok
    arch.moe_ffn_hidden_size = cfg.moe_intermediate_size
    arch.moe_norm_topk_prob = bool(cfg.norm_topk_prob)
    arch.moe_aux_loss_coeff = float(getattr(cfg, "router_aux_loss_coef", 0.0) or 0.0)
    return arch


QWEN3_MOE = register(FamilySpec(
    name="qwen3_moe",
    model_types=("qwen3_moe",),
    hf_model_class="Qwen3MoeForCausalLM",
    text_arch=_arch,
    weights="mvlm.models.qwen3_moe.weights:mappings",
    template="mvlm.models.qwen3_moe.template:Qwen3MoeTemplate",
    tiny="mvlm.models.qwen3_moe.tiny:TINY",
))
