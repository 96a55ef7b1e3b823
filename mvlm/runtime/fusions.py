"""Which fused kernels a run turns on: one pure decision from (device, layer spec, what is
installed, model features), applied to the TransformerConfig by :mod:`mvlm.models.gpt`.

Why one pure function: the switches interact with the device (CPU runs must keep the unfused
arithmetic the parity tests compare bit for bit, and most fused kernels are CUDA-only), with what
is installed (some need Transformer Engine or apex, and Megatron-Core fails at build or first
backward when asked for a fusion whose kernel is missing), and with the model (a fusion exists
for SwiGLU/GeGLU but not for GELU-tanh or squared ReLU). Deciding it here, from plain values,
lets unit tests check every case without a GPU, and lets ``bench/gpu_check.py`` print the choice
next to tokens/s and MFU.

The choices (see :func:`choose_fusions` for each reason):

* CPU: everything off, packed rows as ``sbhd`` with ``cu_seqlens`` (mvlm's SDPA attention).
* CUDA, either spec: ``bias_activation_fusion`` (Megatron-Core's jit-fused bias + SwiGLU / GeGLU /
  GELU, no TE needed) where the activation has one; ``bias_dropout_fusion`` (fused bias +
  dropout + residual add).
* CUDA + Transformer Engine installed: ``apply_rope_fusion`` (TE's fused RoPE kernel; Megatron-
  Core falls back by itself for multimodal rows of different positions); with the TE spec also
  ``gradient_accumulation_fusion`` (TE linears accumulate weight grads into ``main_grad``) and
  ``moe_grouped_gemm`` (TEGroupedMLP, whose ``weight{E}`` names the conversion tables map).
* CUDA, local spec: ``gradient_accumulation_fusion`` only with apex's
  ``fused_weight_gradient_mlp_cuda`` extension; ``moe_grouped_gemm`` off (the local GroupedMLP
  stores experts as ``weight1``/``weight2`` blobs, which mvlm's conversion tables do not map).
* ``masked_softmax_fusion`` is always off: it only switches Megatron-Core's own
  ``FusedScaleMaskSoftmax`` in ``DotProductAttention``, which mvlm never builds (its core
  attention is SDPA / flash-attn on the local spec, TE's fused attention on the TE spec).
* Packed rows go as ``thd`` (``cu_seqlens`` covering the whole row, the batch dim squeezed) on
  CUDA when TE (the TE spec) or flash-attn's varlen kernel will run the attention, at CP = 1; the
  TE kernel needs ``thd`` to see the sample boundaries at all. Under CP mvlm splits whole rows
  (``mvlm.runtime.cp``), not samples as TE's ``thd`` CP does, so CP > 1 keeps ``sbhd``.
"""
from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass, field

FUSION_FLAGS = ("bias_activation_fusion", "bias_dropout_fusion", "apply_rope_fusion",
                "masked_softmax_fusion", "gradient_accumulation_fusion", "moe_grouped_gemm")


@dataclass(frozen=True)
class Installed:
    """What this process can import (probed once by :func:`probe_installed`)."""

    transformer_engine: bool = False
    apex_wgrad: bool = False  # apex's fused_weight_gradient_mlp_cuda extension
    flash_attn: bool = False  # flash_attn (flash_attn_varlen_func)


@dataclass(frozen=True)
class ModelFeatures:
    """The parts of a text architecture the fusions depend on."""

    activation: str = "silu"  # HF hidden_act name (mvlm.models.gpt.ACTIVATIONS)
    gated_mlp: bool = True
    add_bias_linear: bool = False  # Megatron's o_proj + MLP bias switch
    moe: bool = False
    context_parallel: int = 1


@dataclass(frozen=True)
class FusionChoice:
    """The decision: each Megatron-Core switch, the packed-row layout, and why."""

    bias_activation_fusion: bool = False
    bias_dropout_fusion: bool = False
    apply_rope_fusion: bool = False
    masked_softmax_fusion: bool = False
    gradient_accumulation_fusion: bool = False
    moe_grouped_gemm: bool = False
    packed_qkv_format: str = "sbhd"
    reasons: dict[str, str] = field(default_factory=dict, compare=False)

    def config_kwargs(self) -> dict[str, bool]:
        """The TransformerConfig fields."""
        return {k: getattr(self, k) for k in FUSION_FLAGS}

    def report(self) -> dict[str, object]:
        """Every choice with its reason: what ``bench/gpu_check.py`` prints."""
        out = asdict(self)
        reasons = out.pop("reasons")
        return {k: {"on": v, "why": reasons.get(k, "")} if isinstance(v, bool) else
                {"value": v, "why": reasons.get(k, "")} for k, v in out.items()}


def probe_installed() -> Installed:
    """Which optional kernel packages import here (find_spec only: nothing is imported)."""
    def has(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            return False

    return Installed(transformer_engine=has("transformer_engine"),
                     apex_wgrad=has("fused_weight_gradient_mlp_cuda"),
                     flash_attn=has("flash_attn"))


def _activation_fusion(f: ModelFeatures) -> tuple[bool, str]:
    if f.activation in ("silu", "swish") and f.gated_mlp:
        return True, "SwiGLU: Megatron-Core's fused bias + SwiGLU (jit, no TE needed)"
    if f.activation == "gelu" and f.gated_mlp:
        return True, "GeGLU: Megatron-Core's fused bias + GeGLU"
    if f.activation == "gelu" and f.add_bias_linear:
        return True, "GELU with bias: Megatron-Core's fused bias + GELU"
    return False, (f"no Megatron-Core fusion for hidden_act={f.activation!r}"
                   f"{' (gated)' if f.gated_mlp else ''}")


def choose_fusions(device: str, backend: str, installed: Installed,
                   features: ModelFeatures) -> FusionChoice:
    """The fused kernels for a run on ``device`` ("cuda" | "cpu") with the ``backend`` layer spec
    ("te" | "local"). Pure: the same arguments give the same choice."""
    if backend not in ("te", "local"):
        raise ValueError(f"backend must be 'te' or 'local', got {backend!r}")
    if device != "cuda":
        why = "CPU run: unfused kernels (the arithmetic the parity tests compare)"
        return FusionChoice(reasons={**{k: why for k in FUSION_FLAGS},
                                     "packed_qkv_format": why + "; mvlm's SDPA attention"})
    te = installed.transformer_engine
    reasons: dict[str, str] = {}
    act, reasons["bias_activation_fusion"] = _activation_fusion(features)
    reasons["bias_dropout_fusion"] = "fused bias + dropout + residual add (jit, no TE needed)"
    reasons["apply_rope_fusion"] = (
        "TE's fused RoPE kernel" if te else
        "Megatron-Core's fused RoPE kernel comes from TE; not installed")
    reasons["masked_softmax_fusion"] = (
        "only Megatron's DotProductAttention uses it; mvlm's core attention is "
        + ("TE's fused attention" if backend == "te" else "SDPA / flash-attn"))
    if backend == "te":
        accum = True
        reasons["gradient_accumulation_fusion"] = "TE linears accumulate wgrad into main_grad"
    else:
        accum = installed.apex_wgrad
        reasons["gradient_accumulation_fusion"] = (
            "apex fused_weight_gradient_mlp_cuda" if accum else
            "local spec needs apex's fused_weight_gradient_mlp_cuda; not installed")
    grouped = features.moe and backend == "te"
    reasons["moe_grouped_gemm"] = (
        "dense model" if not features.moe else
        "TEGroupedMLP (weight{E}, mapped by the conversion tables)" if grouped else
        "local GroupedMLP's weight1/weight2 layout is not in the conversion tables")
    varlen = backend == "te" or installed.flash_attn
    thd = varlen and features.context_parallel == 1
    reasons["packed_qkv_format"] = (
        ("thd: " + ("TE fused attention" if backend == "te" else "flash_attn_varlen_func")
         + " with cu_seqlens") if thd else
        "sbhd: CP > 1 splits whole rows, not samples" if varlen else
        "sbhd: no varlen kernel (neither TE nor flash-attn installed); SDPA with a segment mask")
    return FusionChoice(bias_activation_fusion=act, bias_dropout_fusion=True,
                        apply_rope_fusion=te, masked_softmax_fusion=False,
                        gradient_accumulation_fusion=accum, moe_grouped_gemm=grouped,
                        packed_qkv_format="thd" if thd else "sbhd", reasons=reasons)
