"""The weight table of a Llama/Qwen-style decoder, shared by every family that uses one.

Read top to bottom it is the whole truth about the language model's weights: Megatron-Core name
on the left (local layer spec names; TE names are derived by ``te_aliases``), HF names on the
right, with the primitive that says how they are split.
"""
from __future__ import annotations

from mvlm.convert.mapping import (
    QKV,
    GatedMLP,
    Mapping,
    Replicated,
    Row,
    VocabColumn,
    te_aliases,
)
from mvlm.models.gpt import TextArch


def decoder_table(arch: TextArch, prefix: str = "model.", lm_head: str = "lm_head.weight"
                  ) -> list[Mapping]:
    d = "decoder.layers.{L}."
    h = prefix + "layers.{L}."
    t: list[Mapping] = [
        VocabColumn("embedding.word_embeddings.weight", prefix + "embed_tokens.weight"),
        Replicated(d + "input_layernorm.weight", h + "input_layernorm.weight"),
        QKV(d + "self_attention.linear_qkv.weight", h + "self_attn.q_proj.weight",
            h + "self_attn.k_proj.weight", h + "self_attn.v_proj.weight"),
        Row(d + "self_attention.linear_proj.weight", h + "self_attn.o_proj.weight"),
        Replicated(d + "pre_mlp_layernorm.weight", h + "post_attention_layernorm.weight"),
        Replicated("decoder.final_layernorm.weight", prefix + "norm.weight"),
    ]
    if arch.qkv_bias:
        t.append(QKV(d + "self_attention.linear_qkv.bias", h + "self_attn.q_proj.bias",
                     h + "self_attn.k_proj.bias", h + "self_attn.v_proj.bias"))
    if arch.qk_layernorm:
        t += [Replicated(d + "self_attention.q_layernorm.weight", h + "self_attn.q_norm.weight"),
              Replicated(d + "self_attention.k_layernorm.weight", h + "self_attn.k_norm.weight")]
    if arch.num_experts:
        e = d + "mlp.experts.local_experts.{E}."
        he = h + "mlp.experts.{E}."
        t += [
            Replicated(d + "mlp.router.weight", h + "mlp.gate.weight"),
            GatedMLP(e + "linear_fc1.weight", he + "gate_proj.weight", he + "up_proj.weight",
                     expert=True),
            Row(e + "linear_fc2.weight", he + "down_proj.weight", expert=True),
        ]
        if arch.moe_shared_expert_size:
            s = d + "mlp.shared_experts."
            hs = h + "mlp.shared_expert."
            t += [GatedMLP(s + "linear_fc1.weight", hs + "gate_proj.weight",
                           hs + "up_proj.weight"),
                  Row(s + "linear_fc2.weight", hs + "down_proj.weight"),
                  Replicated(s + "gate_weight", h + "mlp.shared_expert_gate.weight")]
    else:
        t += [GatedMLP(d + "mlp.linear_fc1.weight", h + "mlp.gate_proj.weight",
                       h + "mlp.up_proj.weight"),
              Row(d + "mlp.linear_fc2.weight", h + "mlp.down_proj.weight")]
    # Untied: the output layer is its own HF tensor. Tied: HF stores only the embedding, and the
    # last pipeline stage's copy of it (Megatron keeps one when PP > 1) is loaded from it.
    t.append(VocabColumn("output_layer.weight",
                         prefix + "embed_tokens.weight" if arch.tie_word_embeddings else lm_head))
    return te_aliases(t)
