"""HF text config -> Megatron-Core TransformerConfig, and the GPT decoder built from it.

Everything a family needs to say about its language model is in ``TextArch`` (read off the HF
config by the family file); this module turns it into Megatron-Core objects for one parallel
layout. Numerics-relevant choices are explicit: no fused kernels that would change rounding on
CPU, HF's RMSNorm, explicit 3-row position ids for every family (``mrope``), so packed samples
restart their positions and CP slices them the same way for text-only and multimodal models.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.enums import AttnBackend
from megatron.core.transformer.transformer_config import TransformerConfig

from mvlm.models.attention import ATTN_KERNELS
from mvlm.models.recompute import RecomputeConfig, RecomputeError  # noqa: F401 - re-exported
from mvlm.models.spec import decoder_block_spec
from mvlm.runtime.parallel import ParallelLayout

VOCAB_PAD_MULTIPLE = 128


class LayoutError(ValueError):
    """A parallel layout that this model cannot be split into; the message names the fix."""


@dataclass
class TextArch:
    """The language model's architecture, independent of HF's field names."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    qk_layernorm: bool = False
    mrope_section: list[int] | None = None
    # MoE
    num_experts: int | None = None
    moe_topk: int = 2
    moe_ffn_hidden_size: int | None = None
    moe_norm_topk_prob: bool = True
    moe_aux_loss_coeff: float = 0.0
    moe_shared_expert_size: int | None = None
    extra: dict = field(default_factory=dict)


def padded_vocab_size(vocab_size: int, tp: int, multiple: int = VOCAB_PAD_MULTIPLE) -> int:
    """Pad to a multiple that does not depend on TP (for power-of-two TP up to 128), so a
    checkpoint written at one TP loads at another without reshaping the embedding."""
    m = multiple if multiple % tp == 0 else math.lcm(multiple, tp)
    return int(math.ceil(vocab_size / m) * m)


def validate_layout(arch: TextArch, layout: ParallelLayout) -> None:
    tp = layout.tp
    problems = []
    if arch.num_heads % tp:
        problems.append(f"num_attention_heads={arch.num_heads}")
    if arch.num_kv_heads % tp:
        problems.append(f"num_key_value_heads={arch.num_kv_heads}")
    if arch.num_experts is not None:
        etp = layout.etp or tp
        if arch.num_experts % layout.ep:
            problems.append(f"num_experts={arch.num_experts} (by --ep {layout.ep})")
        if (arch.moe_ffn_hidden_size or arch.ffn_hidden_size) % etp:
            problems.append(f"moe_intermediate_size={arch.moe_ffn_hidden_size} (by ETP {etp})")
    elif layout.ep > 1:
        problems.append(f"--ep {layout.ep} on a dense model (no experts)")
    if arch.ffn_hidden_size % tp and arch.num_experts is None:
        problems.append(f"intermediate_size={arch.ffn_hidden_size}")
    if problems:
        divisors = [d for d in (1, 2, 4, 8, 16) if arch.num_heads % d == 0
                    and arch.num_kv_heads % d == 0]
        raise LayoutError(
            f"TP={tp}/EP={layout.ep} does not divide " + ", ".join(problems)
            + f". Choose --tp from {divisors}" + (
                f" and --ep dividing {arch.num_experts}" if arch.num_experts else "")
        )
    if arch.num_layers % layout.pp:
        raise LayoutError(
            f"PP={layout.pp} does not divide num_hidden_layers={arch.num_layers}: choose --pp "
            f"from {[d for d in range(1, arch.num_layers + 1) if arch.num_layers % d == 0]}"
        )


# ---- core attention kernel (the --attn_impl flag) ---------------------------------------------
# mvlm's own names; SDPACoreAttention reads ``MvlmTransformerConfig.core_attn_impl``.
ATTN_IMPLS = ATTN_KERNELS


@dataclass
class MvlmTransformerConfig(TransformerConfig):
    """TransformerConfig plus the choices Megatron-Core has no field for on the local spec.

    A subclass (rather than an attribute set after construction) so the field survives the
    ``copy.deepcopy``/``dataclasses.replace`` copies Megatron makes for sub-modules.
    """

    core_attn_impl: str = "auto"
    """Kernel of mvlm's ``SDPACoreAttention`` (see mvlm.models.attention): auto | flash | sdpa
    | eager."""


def transformer_config(arch: TextArch, layout: ParallelLayout, *, dtype: torch.dtype,
                       device: str, sequence_parallel: bool = False,
                       recompute_granularity: str | None = None,
                       recompute: RecomputeConfig | None = None, attn_impl: str = "auto",
                       perform_initialization: bool = True, dropout: float = 0.0,
                       moe_dispatcher: str | None = None) -> TransformerConfig:
    """The Megatron-Core config of ``arch`` at ``layout``. ``recompute_granularity`` alone is a
    shorthand for ``RecomputeConfig(granularity)`` (full -> uniform, 1 layer per checkpoint)."""
    validate_layout(arch, layout)
    if recompute is not None and recompute_granularity is not None:
        raise TypeError("pass recompute=RecomputeConfig(...) or recompute_granularity, not both")
    recompute = recompute or RecomputeConfig(granularity=recompute_granularity)
    recompute_kw = recompute.megatron_kwargs(arch, layout)
    if attn_impl not in ATTN_IMPLS:
        raise ValueError(f"--attn_impl {attn_impl!r}: use one of {', '.join(ATTN_IMPLS)}")
    # The TE spec's attention obeys Megatron's attention_backend (GPTModel turns it into the
    # NVTE_* switches). Only set off 'auto' on GPUs: those switches are process-wide env vars that
    # Megatron asserts are unchanged, and CPU runs (several runs per test process) never use TE.
    te_backend = {"auto": AttnBackend.auto, "flash": AttnBackend.flash,
                  "sdpa": AttnBackend.fused, "eager": AttnBackend.unfused}[attn_impl]
    moe = {}
    if arch.num_experts:
        moe = dict(
            num_moe_experts=arch.num_experts,
            moe_router_topk=arch.moe_topk,
            moe_ffn_hidden_size=arch.moe_ffn_hidden_size,
            # softmax over all experts then top-k, renormalised iff norm_topk_prob: HF's order.
            moe_router_pre_softmax=not arch.moe_norm_topk_prob,
            moe_router_score_function="softmax",
            moe_router_load_balancing_type="aux_loss" if arch.moe_aux_loss_coeff else "none",
            moe_aux_loss_coeff=arch.moe_aux_loss_coeff,
            moe_grouped_gemm=False,
            # gloo lacks the variable all-to-all the alltoall dispatcher needs on CPU.
            moe_token_dispatcher_type=moe_dispatcher or ("alltoall" if device == "cuda"
                                                         else "allgather"),
            moe_shared_expert_intermediate_size=arch.moe_shared_expert_size,
            moe_permute_fusion=False,
        )
    return MvlmTransformerConfig(
        core_attn_impl=attn_impl,
        attention_backend=te_backend if device == "cuda" else AttnBackend.auto,
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        ffn_hidden_size=arch.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_layernorm,
        hidden_dropout=dropout,
        attention_dropout=dropout,
        mrope_section=arch.mrope_section or default_mrope_section(arch.head_dim),
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        context_parallel_size=layout.cp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp or layout.tp,
        sequence_parallel=sequence_parallel and layout.tp > 1,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=device == "cpu",
        perform_initialization=perform_initialization,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        **recompute_kw,
        # gloo cannot batch isend/irecv for the interleaved schedule (grads silently wrong).
        batch_p2p_comm=device == "cuda",
        **moe,
    )


def default_mrope_section(head_dim: int) -> list[int]:
    """For text-only models all three position rows are equal, so any split of the rotary
    frequencies gives plain RoPE; this one just has to sum to head_dim/2."""
    half = head_dim // 2
    return [half - 2 * (half // 3), half // 3, half // 3]


def build_gpt(arch: TextArch, config: TransformerConfig, backend: str, *,
              pre_process: bool | None = None, post_process: bool | None = None,
              vocab_padded: int | None = None, vp_stage: int | None = None) -> GPTModel:
    from megatron.core.transformer.transformer_block import get_num_layers_to_build

    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False,
                                                             vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False,
                                                             vp_stage=vp_stage)
    n_here = get_num_layers_to_build(config, vp_stage=vp_stage)
    return GPTModel(
        config=config,
        transformer_layer_spec=decoder_block_spec(config, backend, n_here),
        vocab_size=vocab_padded or padded_vocab_size(arch.vocab_size,
                                                     config.tensor_model_parallel_size),
        max_sequence_length=arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="mrope",
        # vlm.py merges image embeddings into the full sequence, then does the SP scatter.
        scatter_embedding_sequence_parallel=False,
        rotary_base=int(arch.rope_theta) if float(arch.rope_theta).is_integer()
        else arch.rope_theta,
        vp_stage=vp_stage,
    )
