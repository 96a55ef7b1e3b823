"""The weight table of a Llama/Qwen-style decoder, shared by every family that uses one.

Read top to bottom it is the whole truth about the language model's weights: Megatron-Core name
on the left (local layer spec names; TE names are derived by ``te_aliases``), HF names on the
right, with the primitive that says how they are split. Which rows exist follows ``TextArch``
(biases, LayerNorm biases, q/k-norms, gated or plain MLP, experts); ``HFNames`` holds the HF
module names, which differ between families for the same tensor (StarCoder2's ``mlp.c_fc``).
"""
from __future__ import annotations

from dataclasses import dataclass

from mvlm.convert.mapping import (
    QKV,
    Column,
    GatedMLP,
    Mapping,
    Replicated,
    Row,
    VocabColumn,
    te_aliases,
)
from mvlm.models.gpt import TextArch


@dataclass(frozen=True)
class HFNames:
    """HF module names inside one decoder layer (and the final norm), Llama's by default."""

    input_norm: str = "input_layernorm"
    post_attn_norm: str = "post_attention_layernorm"
    final_norm: str = "norm"
    q: str = "self_attn.q_proj"
    k: str = "self_attn.k_proj"
    v: str = "self_attn.v_proj"
    o: str = "self_attn.o_proj"
    q_norm: str = "self_attn.q_norm"
    k_norm: str = "self_attn.k_norm"
    gate: str = "mlp.gate_proj"
    up: str = "mlp.up_proj"  # the single input projection of an ungated MLP
    down: str = "mlp.down_proj"


LLAMA_NAMES = HFNames()


def _norm(mcore: str, hf: str, arch: TextArch) -> list[Mapping]:
    rows: list[Mapping] = [Replicated(mcore + ".weight", hf + ".weight")]
    if arch.normalization == "LayerNorm":
        rows.append(Replicated(mcore + ".bias", hf + ".bias"))
    return rows


def decoder_table(arch: TextArch, prefix: str = "model.", lm_head: str = "lm_head.weight",
                  names: HFNames = LLAMA_NAMES) -> list[Mapping]:
    n = names
    d = "decoder.layers.{L}."
    h = prefix + "layers.{L}."
    a = d + "self_attention."
    t: list[Mapping] = [
        VocabColumn("embedding.word_embeddings.weight", prefix + "embed_tokens.weight"),
        *_norm(d + "input_layernorm", h + n.input_norm, arch),
        QKV(a + "linear_qkv.weight", h + n.q + ".weight", h + n.k + ".weight",
            h + n.v + ".weight"),
        Row(a + "linear_proj.weight", h + n.o + ".weight"),
        *_norm(d + "pre_mlp_layernorm", h + n.post_attn_norm, arch),
        *_norm("decoder.final_layernorm", prefix + n.final_norm, arch),
    ]
    if arch.qkv_bias:
        t.append(QKV(a + "linear_qkv.bias", h + n.q + ".bias", h + n.k + ".bias",
                     h + n.v + ".bias"))
    if arch.attn_out_bias:  # added once after the row-parallel reduce: the same on every rank
        t.append(Replicated(a + "linear_proj.bias", h + n.o + ".bias"))
    if arch.qk_layernorm:
        t += [*_norm(a + "q_layernorm", h + n.q_norm, arch),
              *_norm(a + "k_layernorm", h + n.k_norm, arch)]
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
        t += _dense_mlp(d + "mlp.", h, n, arch)
    # Untied: the output layer is its own HF tensor. Tied: HF stores only the embedding, and the
    # last pipeline stage's copy of it (Megatron keeps one when PP > 1) is loaded from it.
    t.append(VocabColumn("output_layer.weight",
                         prefix + "embed_tokens.weight" if arch.tie_word_embeddings else lm_head))
    return te_aliases(t)


def _dense_mlp(m: str, h: str, n: HFNames, arch: TextArch) -> list[Mapping]:
    kinds = ["weight"] + (["bias"] if arch.mlp_bias else [])
    rows: list[Mapping] = []
    for kind in kinds:
        if arch.gated_mlp:  # each TP rank holds [its gate rows; its up rows]
            rows.append(GatedMLP(f"{m}linear_fc1.{kind}", f"{h}{n.gate}.{kind}",
                                 f"{h}{n.up}.{kind}"))
        else:
            rows.append(Column(f"{m}linear_fc1.{kind}", f"{h}{n.up}.{kind}"))
    rows.append(Row(m + "linear_fc2.weight", h + n.down + ".weight"))
    if arch.mlp_bias:
        rows.append(Replicated(m + "linear_fc2.bias", h + n.down + ".bias"))
    return rows
