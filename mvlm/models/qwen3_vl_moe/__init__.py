"""Qwen3-VL-MoE: Qwen3-VL (DeepStack, interleaved mRoPE, timestamped video frames -- all from
:mod:`mvlm.models.qwen3_vl`) whose decoder layers are Qwen3-MoE blocks (softmax router, top-k
with the weights always renormalised, no shared expert).

Two things differ from its parts: the checkpoint stores each layer's experts fused into two
tensors (``weights.py`` slices them per expert for Megatron-Core and re-fuses on export), and
the ViT is transformers' ``Qwen3VLMoeVisionModel`` (same blocks, its own config class).
Files: ``weights.py``, ``template.py``, ``tiny.py``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from mvlm.models.qwen3_vl import (
    ALIGNER_PREFIXES,
    MEDIA,
    PEFT_TOWER_PREFIXES,
    deepstack_levels,
    hf_forward_inputs,
    position_ids,
    qwen3_vl_text_arch,
)
from mvlm.models.registry import FamilySpec, VisionSpec, register

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PretrainedConfig

    from mvlm.models.gpt import TextArch


def qwen3_vl_moe_text_arch(cfg: PretrainedConfig) -> TextArch:
    """Qwen3-VL's decoder (q/k-norm, interleaved mRoPE) with every MLP a routed-expert block."""
    tc = cfg.text_config
    if tc.mlp_only_layers:
        raise ValueError("Qwen3-VL-MoE with text_config.mlp_only_layers (dense layers among MoE "
                         "layers) is not supported yet: every layer must be sparse")
    if tc.decoder_sparse_step != 1:
        raise ValueError("Qwen3-VL-MoE with text_config.decoder_sparse_step != 1 is not "
                         "supported yet: every layer must be sparse")
    arch = qwen3_vl_text_arch(cfg)
    arch.num_experts = tc.num_experts
    arch.moe_topk = tc.num_experts_per_tok
    arch.moe_ffn_hidden_size = tc.moe_intermediate_size
    arch.moe_norm_topk_prob = True  # HF's Qwen3VLMoeTextTopKRouter always renormalises
    arch.moe_aux_loss_coeff = float(getattr(tc, "router_aux_loss_coef", 0.0) or 0.0)
    return arch


def _vision(cfg: PretrainedConfig, dtype: torch.dtype, device: str) -> nn.Module:
    from mvlm.models.qwen3_vl_moe.weights import build_tower

    return build_tower(cfg, dtype, device)


QWEN3_VL_MOE = register(FamilySpec(
    name="qwen3_vl_moe",
    model_types=("qwen3_vl_moe",),
    hf_model_class="Qwen3VLMoeForConditionalGeneration",
    text_arch=qwen3_vl_moe_text_arch,
    weights="mvlm.models.qwen3_vl_moe.weights:mappings",
    template="mvlm.models.qwen3_vl_moe.template:Qwen3VLMoeTemplate",
    tiny="mvlm.models.qwen3_vl_moe.tiny:TINY",
    vision=VisionSpec(build=_vision, media=MEDIA, aligner_prefixes=ALIGNER_PREFIXES,
                      peft_tower_prefixes=PEFT_TOWER_PREFIXES,
                      deepstack_levels=deepstack_levels),
    position_ids=position_ids,
    hf_forward_inputs=hf_forward_inputs,
))
