"""Layer specs: Transformer Engine's when it is importable on a GPU, otherwise Megatron-Core's local
modules with mvlm's SDPA core attention and HF-exact norms (RMSNorm / LayerNorm, see norm.py).

The two specs name their parameters differently (TE fuses the pre-attention norm into
``linear_qkv`` and, in dense layers, the pre-MLP norm into ``linear_fc1``, as
``layer_norm_weight``). Two mechanisms keep which spec a run used out of its checkpoints:
``mvlm.convert.mapping`` knows both module names for HF conversion, and the local spec declares a
``sharded_state_dict_keys_map`` (:func:`te_checkpoint_keys_map`) so that its ``torch_dist`` keys
are TE's. A checkpoint written on a GPU box with TE therefore resumes and exports on a box
without it, and the other way round (``mvlm.convert.ckpt_format`` handles TE's ``_extra_state``).
"""
from __future__ import annotations

import importlib.util
import logging

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from mvlm.models.norm import norm_class

log = logging.getLogger(__name__)


def _with_bias(linear: type, bias: bool) -> type:
    """``linear`` with its ``bias`` argument fixed.

    Megatron-Core decides biases from two switches (``add_qkv_bias``; ``add_bias_linear`` for
    o_proj and the whole MLP at once), but HF families set them per projection (Llama's
    ``attention_bias`` covers q/k/v/o and ``mlp_bias`` the MLP). The local spec therefore builds
    each projection with the bias its HF counterpart has; the class is still a
    Column/RowParallelLinear, so TP, LoRA and checkpoints treat it as one."""
    class FixedBias(linear):
        def __init__(self, *args, **kwargs) -> None:
            kwargs["bias"] = bias
            super().__init__(*args, **kwargs)

    FixedBias.__name__ = FixedBias.__qualname__ = linear.__name__
    return FixedBias


def _biases(config: TransformerConfig) -> tuple[bool, bool, bool]:
    """(qkv, attention output, MLP) biases; a plain TransformerConfig has Megatron's meaning."""
    if not hasattr(config, "attn_out_bias"):  # Megatron-Core's own TransformerConfig
        both = config.add_bias_linear
        return config.add_qkv_bias or both, both, both
    return config.add_qkv_bias, config.attn_out_bias, config.mlp_bias


def te_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def choose_backend(device: str, requested: str = "auto") -> str:
    """'te' or 'local'. TE needs a GPU; asking for it without one falls back with a warning."""
    if requested not in ("auto", "te", "local"):
        raise ValueError(f"--transformer_impl must be auto, te or local, got {requested!r}")
    if requested == "local":
        return "local"
    ok = device == "cuda" and te_available()
    if requested == "te" and not ok:
        log.warning("Transformer Engine requested but not usable here (device=%s); using the "
                    "local spec with SDPA attention", device)
    return "te" if ok else "local"


def te_checkpoint_keys_map(is_moe: bool) -> dict[str, str]:
    """Prefix map from the local spec's norm names to the checkpoint keys TE writes for them.

    TE fuses ``input_layernorm`` into ``self_attention.linear_qkv`` in every layer, but
    ``pre_mlp_layernorm`` into ``mlp.linear_fc1`` only in dense layers: Megatron-Core's TE spec
    keeps a separate ``pre_mlp_layernorm`` (TENorm) in front of a MoE block, whose router and
    experts have no fused norm. q/k-norms, biases and the final norm are named alike in both.
    The prefixes end in '.', so ``weight``/``bias`` map to ``layer_norm_weight``/``_bias``."""
    keys_map = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_"}
    if not is_moe:
        keys_map["pre_mlp_layernorm."] = "mlp.linear_fc1.layer_norm_"
    return keys_map


def local_layer_spec(config: TransformerConfig) -> ModuleSpec:
    from mvlm.models.attention import SDPACoreAttention
    from mvlm.models.kv_cache import RotatedCacheSelfAttention

    backend = LocalSpecProvider()
    num_experts = config.num_moe_experts
    qkv_bias, out_bias, mlp_bias = _biases(config)
    col, row = backend.column_parallel_linear(), backend.row_parallel_linear()
    norm = norm_class(config)
    if num_experts:
        mlp = get_moe_module_spec_for_backend(
            backend=backend, num_experts=num_experts, moe_grouped_gemm=False,
        )
    else:
        mlp = ModuleSpec(
            module=MLP,
            submodules=MLPSubmodules(
                linear_fc1=_with_bias(col, mlp_bias),
                linear_fc2=_with_bias(row, mlp_bias),
            ),
        )
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                # SelfAttention with RoPE applied once as keys enter a KV cache (rollouts)
                module=RotatedCacheSelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=_with_bias(col, qkv_bias),
                    core_attention=SDPACoreAttention,
                    linear_proj=_with_bias(row, out_bias),
                    q_layernorm=norm if config.qk_layernorm else IdentityOp,
                    k_layernorm=norm if config.qk_layernorm else IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=te_checkpoint_keys_map(is_moe=bool(num_experts)),
        ),
    )


def te_layer_spec(config: TransformerConfig) -> ModuleSpec:
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    qkv_bias, out_bias, mlp_bias = _biases(config)
    if out_bias != mlp_bias or (out_bias and not qkv_bias):
        raise ValueError(
            f"biases qkv={qkv_bias} o_proj={out_bias} mlp={mlp_bias} (HF attention_bias / "
            "mlp_bias) cannot be built by the Transformer Engine spec, which ties o_proj and MLP "
            "biases together: run with --transformer_impl local")

    return get_gpt_layer_with_transformer_engine_spec(
        num_experts=config.num_moe_experts,
        # TEGroupedMLP for MoE (mvlm.runtime.fusions sets moe_grouped_gemm for the TE spec)
        moe_grouped_gemm=bool(config.num_moe_experts) and config.moe_grouped_gemm,
        qk_layernorm=config.qk_layernorm,
    )


def decoder_block_spec(config: TransformerConfig, backend: str, num_layers_here: int
                       ) -> TransformerBlockSubmodules:
    """The whole block: layer specs for this stage plus the final norm."""
    if backend == "te":
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        layer = te_layer_spec(config)
        final_norm = TESpecProvider().layer_norm(rms_norm=config.normalization == "RMSNorm")
    else:
        layer = local_layer_spec(config)
        final_norm = norm_class(config)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers_here,
                                      layer_norm=final_norm)
