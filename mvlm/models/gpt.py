"""HF text config -> Megatron-Core TransformerConfig, and the GPT decoder built from it.

Everything a family needs to say about its language model is in ``TextArch`` (read off the HF
config by the family file); this module turns it into Megatron-Core objects for one parallel
layout. Numerics-relevant choices are explicit: fused kernels only on CUDA, decided in
``mvlm.runtime.fusions`` (none on CPU, where they would change rounding), HF's norms
(``mvlm.models.norm``), explicit 3-row position ids for every family (``mrope``),
so packed samples restart their positions and CP slices them the same way for text-only and
multimodal models.

The architecture options cover Llama/Mistral/Qwen/Gemma/StarCoder2/Nemotron-style decoders: norm
type (RMSNorm or LayerNorm, optionally zero-centred ``(1 + w)``), MLP activation (gated or not),
biases on QKV / the attention output / the MLP as separate switches, q/k-norm, and RoPE with a
base, a rotary fraction and default / linear / llama3 / YaRN frequencies (``mvlm.models.rope``).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.enums import AttnBackend
from megatron.core.transformer.transformer_config import TransformerConfig

from mvlm.models.attention import ATTN_KERNELS
from mvlm.models.recompute import RecomputeConfig, RecomputeError  # noqa: F401 - re-exported
from mvlm.models.rope import RopeScaling, rope_inv_freq
from mvlm.models.spec import decoder_block_spec
from mvlm.runtime.cpu import batch_p2p_comm_supported
from mvlm.runtime.fusions import FusionChoice, ModelFeatures, choose_fusions, probe_installed
from mvlm.runtime.parallel import ParallelLayout

VOCAB_PAD_MULTIPLE = 128


class LayoutError(ValueError):
    """A parallel layout that this model cannot be split into; the message names the fix."""


class ArchError(ValueError):
    """An architecture option mvlm cannot build; the message names the HF field and the fix."""


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation: HF's ``gelu_pytorch_tanh`` (Gemma, StarCoder2)."""
    return F.gelu(x, approximate="tanh")


def squared_relu(x: torch.Tensor) -> torch.Tensor:
    """``relu(x)^2``: HF's ``relu2`` (Nemotron); same arithmetic as Megatron-Core's
    ``megatron.core.activations.squared_relu`` without its TorchScript wrapper."""
    return torch.square(F.relu(x))


# HF ``hidden_act`` name -> the elementwise function Megatron-Core's MLP applies (to the gate half
# when the MLP is gated). Names whose HF arithmetic differs from these (``gelu_new``,
# ``gelu_fast``, ``quick_gelu``...) are refused rather than approximated.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": gelu_tanh,
    "relu": F.relu,
    "relu2": squared_relu,
}
NORMS = ("RMSNorm", "LayerNorm")


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
    # Norms: "RMSNorm" | "LayerNorm" (with bias); zero-centred weights are applied as (1 + w)
    # (Gemma's RMSNorm, Nemotron's LayerNorm1P). q/k-norms use the same type.
    normalization: str = "RMSNorm"
    norm_zero_centered_gamma: bool = False
    # MLP: HF's hidden_act name (see ACTIVATIONS) and whether it gates an up projection
    # (SwiGLU/GeGLU: gate_proj + up_proj) or is applied to one projection (c_fc / up_proj).
    activation: str = "silu"
    gated_mlp: bool = True
    # Biases beyond qkv_bias: the attention output projection (o_proj) and every MLP linear.
    attn_out_bias: bool = False
    mlp_bias: bool = False
    # RoPE: fraction of head_dim that rotates (HF partial_rotary_factor) and the frequency
    # variant (HF rope_parameters.rope_type and its fields).
    rotary_percent: float = 1.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    # Token embeddings are multiplied by this before anything is merged in (Gemma: the square
    # root of hidden_size, as an fp32 scalar cast to the activations' dtype, HF's arithmetic).
    embedding_multiplier: float = 1.0
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


def rotary_dim(arch: TextArch) -> int:
    """Channels of a head that rotate (Megatron-Core's and HF's ``int(head_dim * fraction)``)."""
    return int(arch.head_dim * arch.rotary_percent) if arch.rotary_percent < 1.0 \
        else arch.head_dim


def validate_arch(arch: TextArch) -> None:
    """Refuse options with no exact Megatron-Core equivalent, naming the HF config field."""
    if arch.normalization not in NORMS:
        raise ArchError(f"normalization {arch.normalization!r}: mvlm builds {' / '.join(NORMS)}")
    if arch.activation not in ACTIVATIONS:
        raise ArchError(
            f"hidden_act={arch.activation!r} is not supported: use one of "
            f"{', '.join(ACTIVATIONS)} (others round differently from Megatron-Core's MLP)")
    if not 0.0 < arch.rotary_percent <= 1.0 or rotary_dim(arch) % 2:
        raise ArchError(
            f"partial_rotary_factor={arch.rotary_percent} gives {rotary_dim(arch)} rotary "
            f"channels of head_dim={arch.head_dim}: it must be in (0, 1] and give an even count")
    if arch.num_experts and (arch.mlp_bias or not arch.gated_mlp or arch.activation != "silu"):
        raise ArchError("MoE layers are built as bias-free SwiGLU experts: mlp_bias / hidden_act "
                        f"{arch.activation!r} on an MoE config is not supported")


def validate_layout(arch: TextArch, layout: ParallelLayout, *,
                    sequence_parallel: bool | None = None) -> None:
    """Refuse a layout the model cannot be split into, naming the fix.

    ``sequence_parallel``: the training run's flag; None where nothing is trained (``mvlm
    convert``, export), which may split MoE over TP without it. Megatron-Core's MoE layer raises
    in the first training forward when TP > 1 without sequence parallel, so training refuses
    that here, before any model is built.
    """
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
    if arch.num_experts is not None and tp > 1 and sequence_parallel is False:
        raise LayoutError(
            f"MoE ({arch.num_experts} experts) at --tp {tp} trains only with sequence parallel "
            "(Megatron-Core refuses MoE with tensor parallelism alone): add "
            "--sequence_parallel true, or use --tp 1 (--ep splits the experts)")
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
    attn_out_bias: bool = False
    """Bias on ``linear_proj`` (HF o_proj). Megatron-Core ties it to ``add_bias_linear`` (with the
    MLP's); the local spec honours the two separately (Llama's attention_bias without mlp_bias)."""
    mlp_bias: bool = False
    """Bias on ``linear_fc1`` / ``linear_fc2``; see ``attn_out_bias``."""
    # Read by Megatron-Core's attention (``_yarn_get_concentration_factor_from_config``) as the
    # factor on cos/sin; 1.0 (no YaRN) gives a factor of exactly 1.
    yarn_rotary_scaling_factor: float = 1.0
    yarn_mscale: float | None = None
    yarn_mscale_all_dim: float | None = None
    packed_qkv_format: str = "sbhd"
    """How packed rows reach the attention (``mvlm.train.steps.packed_params``): ``sbhd`` with
    ``cu_seqlens``, or ``thd`` where a varlen kernel runs it (``mvlm.runtime.fusions``)."""


def fusion_choice(arch: TextArch, layout: ParallelLayout, device: str,
                  backend: str | None = None) -> FusionChoice:
    """The fused kernels of ``arch`` at ``layout`` on ``device`` with the ``backend`` spec (None:
    the one ``choose_backend`` picks by default), from what this process has installed."""
    from mvlm.models.spec import choose_backend

    features = ModelFeatures(activation=arch.activation, gated_mlp=arch.gated_mlp,
                             add_bias_linear=arch.attn_out_bias and arch.mlp_bias,
                             moe=bool(arch.num_experts), context_parallel=layout.cp)
    return choose_fusions(device, backend or choose_backend(device), probe_installed(), features)


def transformer_config(arch: TextArch, layout: ParallelLayout, *, dtype: torch.dtype,
                       device: str, sequence_parallel: bool = False,
                       recompute_granularity: str | None = None,
                       recompute: RecomputeConfig | None = None, attn_impl: str = "auto",
                       perform_initialization: bool = True, dropout: float = 0.0,
                       moe_dispatcher: str | None = None,
                       backend: str | None = None) -> TransformerConfig:
    """The Megatron-Core config of ``arch`` at ``layout``. ``recompute_granularity`` alone is a
    shorthand for ``RecomputeConfig(granularity)`` (full -> uniform, 1 layer per checkpoint).
    ``backend``: the layer spec the config is for ("te" | "local"; None: the default choice),
    which decides the fused kernels with the device (:func:`fusion_choice`)."""
    validate_arch(arch)
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
            # gloo lacks the variable all-to-all the alltoall dispatcher needs on CPU.
            moe_token_dispatcher_type=moe_dispatcher or ("alltoall" if device == "cuda"
                                                         else "allgather"),
            moe_shared_expert_intermediate_size=arch.moe_shared_expert_size,
            moe_permute_fusion=False,
        )
    fused = fusion_choice(arch, layout, device, backend)
    return MvlmTransformerConfig(
        core_attn_impl=attn_impl,
        packed_qkv_format=fused.packed_qkv_format,
        attention_backend=te_backend if device == "cuda" else AttnBackend.auto,
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        ffn_hidden_size=arch.ffn_hidden_size,
        normalization=arch.normalization,
        layernorm_zero_centered_gamma=arch.norm_zero_centered_gamma,
        layernorm_epsilon=arch.norm_eps,
        gated_linear_unit=arch.gated_mlp,
        activation_func=ACTIVATIONS[arch.activation],
        # Megatron-Core's one switch for o_proj + MLP biases; the spec handles them apart.
        add_bias_linear=arch.attn_out_bias and arch.mlp_bias,
        add_qkv_bias=arch.qkv_bias,
        attn_out_bias=arch.attn_out_bias,
        mlp_bias=arch.mlp_bias,
        qk_layernorm=arch.qk_layernorm,
        **_yarn_fields(arch.rope_scaling),
        hidden_dropout=dropout,
        attention_dropout=dropout,
        mrope_section=arch.mrope_section or default_mrope_section(rotary_dim(arch)),
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
        # fused kernels per device / spec / installed packages: mvlm.runtime.fusions (CPU: none)
        **fused.config_kwargs(),
        persist_layer_norm=False,
        **recompute_kw,
        batch_p2p_comm=batch_p2p_comm_supported(device),  # off over gloo: see runtime/cpu.py
        **moe,
    )


def _yarn_fields(scaling: RopeScaling) -> dict:
    if scaling.rope_type != "yarn":
        return {}
    return dict(yarn_rotary_scaling_factor=scaling.factor, yarn_mscale=scaling.mscale,
                yarn_mscale_all_dim=scaling.mscale_all_dim)


def default_mrope_section(rot_dim: int) -> list[int]:
    """For text-only models all three position rows are equal, so any split of the rotary
    frequencies gives plain RoPE; this one just has to sum to rot_dim/2 (rot_dim = head_dim
    unless only part of each head rotates)."""
    half = rot_dim // 2
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
    model = GPTModel(
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
        rotary_percent=arch.rotary_percent,
        vp_stage=vp_stage,
    )
    if arch.rope_scaling.rope_type != "default":
        # The multimodal rotary module computes only default frequencies; the scaled variants
        # differ in nothing else, so give it theirs (see mvlm.models.rope).
        rope = model.rotary_pos_emb
        rope.inv_freq = rope_inv_freq(arch.rope_theta, rotary_dim(arch), arch.rope_scaling).to(
            rope.inv_freq.device)
    return model
