"""Core attention for Megatron-Core's local layer spec: SDPA, packed sequences, context parallel.

Why this exists: Megatron-Core 0.16.1's ``DotProductAttention`` (the local spec's core attention)
allocates its score buffer and default causal mask on ``torch.cuda.current_device()``, rejects
``packed_seq_params`` and asserts ``context_parallel_size == 1`` (CP is left to Transformer
Engine). ``SDPACoreAttention`` is a drop-in for the ``core_attention`` submodule of
``SelfAttentionSubmodules`` that runs on any device, keeps packed samples apart, and implements CP
by all-gathering K/V, so the same model code runs on a CPU/gloo test box and on a GPU.

Layout conventions shared with the data and model code (use the helpers, don't re-derive them):

* Sequences are split for CP the load-balanced way Megatron-Core uses for RoPE
  (``get_pos_emb_on_this_cp_rank``): the length-``S`` sequence is cut into ``2*CP`` equal chunks
  and CP rank ``r`` holds chunks ``r`` and ``2*CP-1-r``, concatenated in that order. See
  :func:`mvlm.runtime.cp.cp_chunk_indices` and :func:`mvlm.runtime.cp.split_for_cp`.
* Packed batches arrive as sbhd with ``b == 1`` plus ``PackedSeqParams(qkv_format="sbhd")``;
  ``cu_seqlens`` describe the FULL (pre-CP-split) sequence. Positions at or after
  ``cu_seqlens[-1]`` (tail padding) form one extra segment of their own.
* ``qkv_format="thd"`` (Megatron squeezes the batch dim) is accepted too. Under CP it follows
  Transformer Engine's layout instead: each sample (``cu_seqlens_*_padded`` when set) is split
  2*CP-ways on its own (:func:`mvlm.runtime.cp.cp_packed_indices`), so a TE-prepared THD
  batch works unchanged.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention
from torch import Tensor

from mvlm.runtime import causal_blocks
from mvlm.runtime.cp import cp_chunk_indices, cp_packed_indices

__all__ = ["SDPACoreAttention"]

_MODEL_PARALLEL_RNG = "model-parallel-rng"
log = logging.getLogger(__name__)

# --attn_impl values the kernel choice understands (mvlm.models.gpt.ATTN_IMPLS).
ATTN_KERNELS = ("auto", "flash", "sdpa", "eager")
_FLASH_FALLBACK_WARNED: set[str] = set()  # one warning per reason per process, not per layer


def eager_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, dropout_p: float,
                    is_causal: bool, scale: float, enable_gqa: bool) -> Tensor:
    """``softmax(QK^T * scale) V`` with explicit matmuls, the SDPA call's contract ([b, h, s, d],
    bool ``attn_mask`` True = may attend, causal = top-left aligned).

    Why a second path: it is what HF's ``eager`` and Megatron's unfused local attention compute,
    materialising the [sq, sk] probabilities, so ``--attn_impl eager`` reproduces those runs and
    serves as the reference the fused kernels are checked against. Softmax runs in fp32 (HF's
    choice) and is cast back to the input dtype before the second matmul.
    """
    if enable_gqa:
        rep = q.size(1) // k.size(1)
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if is_causal:
        sq, sk = scores.shape[-2:]
        causal = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril()
        attn_mask = causal if attn_mask is None else attn_mask & causal
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v)


# --------------------------------------------------------------------------------------------
# Autograd all-gather over the CP group
# --------------------------------------------------------------------------------------------
class _AllGatherSeq(torch.autograd.Function):
    """All-gather along dim 0 in rank order; backward sums every rank's grad into the owner.

    Megatron's own gather helpers use ``all_gather_into_tensor`` / ``reduce_scatter_tensor``,
    which gloo lacks; this uses the list all-gather and, off NCCL, all-reduce + slice.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: dist.ProcessGroup) -> Tensor:  # type: ignore[override]
        ctx.group = group
        ctx.local_len = x.size(0)
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        group = ctx.group
        rank = dist.get_rank(group)
        grad = grad.contiguous()
        if dist.get_backend(group) == "nccl":
            out = grad.new_empty((ctx.local_len, *grad.shape[1:]))
            dist.reduce_scatter_tensor(out, grad, group=group)
            return out, None
        dist.all_reduce(grad, group=group)
        return grad[rank * ctx.local_len : (rank + 1) * ctx.local_len].clone(), None


def _held_positions(
    total: int, cp_size: int, cp_rank: int, thd_bounds: Tensor | None, device: torch.device
) -> Tensor:
    """Global positions of a CP rank's rows: whole-row split (sbhd) or per-sample split (THD)."""
    if thd_bounds is None:
        return cp_chunk_indices(total, cp_size, cp_rank, device=device)
    return cp_packed_indices(thd_bounds, cp_size, cp_rank, total).to(device)


def _gather_seq_global_order(
    x: Tensor, group: dist.ProcessGroup, cp_size: int, thd_bounds: Tensor | None
) -> Tensor:
    """All-gather the CP-local [s_local, ...] tensor and put rows in global sequence order."""
    gathered = _AllGatherSeq.apply(x, group)
    total = gathered.size(0)
    held = torch.cat(
        [_held_positions(total, cp_size, r, thd_bounds, x.device) for r in range(cp_size)]
    )
    return gathered.index_select(0, torch.argsort(held))


# --------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------
def _segment_ids(cu_seqlens: Tensor, positions: Tensor) -> Tensor:
    """Sample index of each global position; positions past cu_seqlens[-1] share the last id."""
    cu = cu_seqlens.to(device=positions.device, dtype=torch.long)
    return torch.searchsorted(cu[1:], positions, right=True)


def _segment_parents(params: PackedSeqParams | None) -> Tensor | None:
    """``segment_parent`` of a packed row (long [n_segments], -1 = none), or None.

    Why: a preference pair packed with one shared prompt (``mvlm.train.objectives.shared_prefix``)
    is three segments -- prompt, chosen, rejected -- where each answer must see the prompt but
    not the other answer. Megatron's ``PackedSeqParams`` only describes disjoint samples, so the
    pair layout adds this attribute: query positions of segment ``s`` may also attend (causally)
    to the keys of segment ``segment_parent[s]``. Absent on ordinary packed rows, whose mask is
    unchanged."""
    return None if params is None else getattr(params, "segment_parent", None)


def _boundaries(params: PackedSeqParams, which: str) -> Tensor:
    """Segment boundaries in the tensor layout: the padded ones when given (THD with padding)."""
    padded = getattr(params, f"cu_seqlens_{which}_padded")
    cu = padded if padded is not None else getattr(params, f"cu_seqlens_{which}")
    if cu is None:
        raise ValueError(f"packed_seq_params.cu_seqlens_{which} is None: set it for packed input")
    return cu


class SDPACoreAttention(MegatronModule):
    """Drop-in ``core_attention`` for Megatron-Core's ``SelfAttention``, built on torch SDPA.

    Inputs are sbhd: ``query [sq, b, np_local, hn]``, ``key/value [sk, b, ng_local, hn]`` (GQA: kv
    may have fewer heads; query head ``h`` uses kv head ``h // (np/ng)`` as Megatron's
    ``repeat_interleave`` does). Output ``[sq, b, np_local*hn]`` like ``DotProductAttention``.
    A THD call (Megatron squeezes b away) is accepted as ``b == 1``.

    Kernel choice (``config.core_attn_impl``, the ``--attn_impl`` flag; ``kernel_used`` records
    what the last forward ran):

    * ``flash``: ``flash_attn`` (imported lazily, never required) when tensors are CUDA
      fp16/bf16, CP == 1, and the mask is plain/causal or packed: ``flash_attn_varlen_func`` /
      ``flash_attn_func`` avoid materialising an ``[sq, sk]`` mask. Where it cannot run (not
      installed, CPU, fp32, CP > 1, a padding mask) the call falls back to SDPA with ONE warning
      per reason: ms-swift scripts pass ``--attn_impl flash_attn`` almost always, and the same
      script must run on a box without flash-attn (the GPU check box has none).
    * ``sdpa``: ``F.scaled_dot_product_attention`` always (torch picks its own fused kernel):
      ``is_causal=True`` for the plain causal case, else an explicit boolean mask built on the
      tensors' device (causal by global position, same packed segment, caller's padding mask).
      In fp32 this matches a naive ``softmax(QK^T * scale) V`` to ~1e-7.
    * ``eager``: :func:`eager_attention`, explicit matmul-softmax-matmul with the same masks.
    * ``auto`` (default): flash-attn where it applies; on CPU, the causal case without packing,
      CP, dropout or a mask other than right padding, large and short enough
      (:func:`mvlm.runtime.causal_blocks.applies`), runs :mod:`mvlm.runtime.causal_blocks`
      (GEMMs over query blocks, faster than torch's CPU flash kernel: docs/benchmarks.md;
      ``kernel_used`` ``"cpu_blocks"``); SDPA otherwise, silently.

    Mask semantics: ``attn_mask_type`` causal/padding_causal adds causality (bottom-right aligned
    when sq != sk, as with a KV cache); ``attention_mask`` (bool, True = masked out, broadcastable
    to ``[b, 1, sq, sk]`` with sk = the full key length, in global order under CP) is ANDed in for
    any mask type; packed segments are always applied (a ``segment_parent`` attribute on
    ``packed_seq_params`` also opens each segment to its parent: shared-prefix preference pairs,
    SDPA/eager only). Query rows with no visible key (padding
    queries) output zeros instead of NaN, so a loss mask of zero cannot turn into NaN grads.

    Context parallel (``config.context_parallel_size > 1``): K/V are all-gathered across the CP
    group (differentiable; backward sums grads back to the owner), reordered to global order and
    attended with a mask over global positions, so results equal the CP=1 computation. Memory is
    O(S) for K/V per rank, which is fine for the sequence lengths the all-gather path targets;
    ring attention is Transformer Engine's job on GPU boxes.

    ``apply_query_key_layer_scaling`` only changes Megatron's fp16 numerics (scale/coeff, then
    *coeff inside softmax); the net scale is the same, so it is ignored here.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
    ) -> None:
        super().__init__(config=config)
        self.config: TransformerConfig = config
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.cp_comm_type = cp_comm_type  # only the all-gather scheme exists here

        if config.softmax_type != "vanilla":
            raise NotImplementedError(
                f"softmax_type={config.softmax_type!r} is not supported by SDPACoreAttention: "
                "use softmax_type='vanilla' or the Transformer Engine spec"
            )
        if is_layer_window_attention(config.window_size, config.window_attn_skip_freq,
                                     layer_number):
            raise NotImplementedError(
                "window_size (sliding-window attention) is not supported by SDPACoreAttention: "
                "unset window_size or use the Transformer Engine spec"
            )
        if getattr(config, "qk_clip", False):
            raise NotImplementedError(
                "qk_clip needs per-head max logits, which SDPACoreAttention does not compute: "
                "unset qk_clip or use the Transformer Engine spec"
            )
        # SelfAttention.clip_qk reads this attribute; keep it present like DotProductAttention.
        self.current_max_attn_logits: Tensor | None = None
        # mvlm.models.gpt.MvlmTransformerConfig carries --attn_impl; a plain TransformerConfig
        # (Megatron's own, tests) means auto.
        self.impl: str = getattr(config, "core_attn_impl", "auto")
        if self.impl not in ATTN_KERNELS:
            raise ValueError(f"--attn_impl {self.impl!r}: use one of {', '.join(ATTN_KERNELS)}")
        self.kernel_used: str | None = None  # "flash_attn" | "sdpa" | "eager", set by forward

        self.tp_group = getattr(pg_collection, "tp", None) if pg_collection is not None else None
        if self.tp_group is None:
            self.tp_group = parallel_state.get_tensor_model_parallel_group(check_initialized=False)
        cp_group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
        if cp_group is None and config.context_parallel_size > 1:
            cp_group = parallel_state.get_context_parallel_group(check_initialized=False)
        self.cp_group: dist.ProcessGroup | None = cp_group
        self.cp_size = 1 if cp_group is None else dist.get_world_size(cp_group)
        if config.context_parallel_size > 1 and self.cp_size != config.context_parallel_size:
            raise ValueError(
                f"config.context_parallel_size={config.context_parallel_size} but the CP group "
                f"has {self.cp_size} ranks: initialise parallel_state with the same CP size or "
                "pass pg_collection.cp"
            )

        tp_size = 1 if self.tp_group is None else dist.get_world_size(self.tp_group)
        self.hidden_size_per_attention_head = config.kv_channels
        if config.num_attention_heads % tp_size or config.num_query_groups % tp_size:
            raise ValueError(
                f"num_attention_heads={config.num_attention_heads} and num_query_groups="
                f"{config.num_query_groups} must both be divisible by TP={tp_size}"
            )
        self.num_attention_heads_per_partition = config.num_attention_heads // tp_size
        self.num_query_groups_per_partition = config.num_query_groups // tp_size

        self.softmax_scale = (
            1.0 / math.sqrt(self.hidden_size_per_attention_head)
            if softmax_scale is None
            else softmax_scale
        )
        self.dropout_p = float(
            config.attention_dropout if attention_dropout is None else attention_dropout
        )

    # ---------------------------------------------------------------------------------------
    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> Tensor:
        """Attend; returns ``[sq, b, np_local*hn]``."""
        if attention_bias is not None:
            raise NotImplementedError(
                "attention_bias is not supported by SDPACoreAttention: use the TE spec"
            )
        thd = query.dim() == 3
        if thd:  # Megatron squeezed the batch dim for qkv_format='thd'
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        self._check_heads(query, key, value)
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        causal = mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)
        if packed_seq_params is not None and query.size(1) != 1:
            raise ValueError(
                f"packed sequences need batch size 1 (got b={query.size(1)}): pack the micro-batch "
                "into one sequence"
            )
        if packed_seq_params is not None and packed_seq_params.local_cp_size not in (
            None,
            self.cp_size,
        ):
            raise NotImplementedError(
                "packed_seq_params.local_cp_size (hierarchical/dynamic CP) is not supported by "
                "SDPACoreAttention: leave it None"
            )

        dropout_p = self.dropout_p if self.training else 0.0
        with self._rng_context(dropout_p):
            out = self._attend(
                query, key, value, attention_mask, causal, packed_seq_params, dropout_p, thd
            )
        # out: [b, np, sq, hn] -> [sq, b, np*hn]
        out = out.permute(2, 0, 1, 3).reshape(query.size(0), query.size(1), -1)
        return out

    # ---------------------------------------------------------------------------------------
    def _check_heads(self, query: Tensor, key: Tensor, value: Tensor) -> None:
        np_local, ng_local = query.size(2), key.size(2)
        if key.shape != value.shape or query.size(-1) != key.size(-1):
            raise ValueError(
                f"key {tuple(key.shape)} / value {tuple(value.shape)} / query "
                f"{tuple(query.shape)} disagree: expected [s, b, heads, head_dim]"
            )
        if np_local % ng_local:
            raise ValueError(
                f"{np_local} local query heads are not a multiple of {ng_local} local kv heads"
            )
        # When num_query_groups < TP, SelfAttention hands us a config copy with
        # num_query_groups == TP, so the config-derived counts still match the shapes.
        if (np_local, ng_local) != (
            self.num_attention_heads_per_partition,
            self.num_query_groups_per_partition,
        ):
            raise ValueError(
                f"got {np_local} query / {ng_local} kv heads, config with this TP size expects "
                f"{self.num_attention_heads_per_partition} / {self.num_query_groups_per_partition}"
                ": check num_attention_heads, num_query_groups and the TP group"
            )

    def _rng_context(self, dropout_p: float) -> Any:
        """Fork Megatron's model-parallel RNG for dropout (heads differ per TP rank), if set up."""
        if dropout_p == 0.0 or self.config.sequence_parallel:
            return contextlib.nullcontext()
        tracker = tensor_parallel.get_cuda_rng_tracker()
        if _MODEL_PARALLEL_RNG in tracker.get_states():
            return tracker.fork()
        return contextlib.nullcontext()

    def _attend(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        causal: bool,
        packed: PackedSeqParams | None,
        dropout_p: float,
        thd: bool = False,
    ) -> Tensor:
        """Core computation; returns [b, np, sq, hn]."""
        cp = self.cp_size
        # THD + CP splits each sample on its own (TE's convention); sbhd splits the whole row.
        thd_bounds = _boundaries(packed, "kv") if (thd and cp > 1 and packed) else None
        if cp > 1:
            if query.size(0) != key.size(0):
                raise ValueError("context parallel attention needs self-attention (sq == sk)")
            ng = key.size(2)
            kv = _gather_seq_global_order(
                torch.cat([key, value], dim=2), self.cp_group, cp, thd_bounds
            )
            key, value = kv[:, :, :ng], kv[:, :, ng:]

        parents = _segment_parents(packed)
        if self.impl in ("auto", "flash"):
            why_not = self._flash_unusable(query, key, attention_mask)
            if why_not is None and parents is not None:
                why_not = "shared-prefix pair rows (segment_parent) need a tree mask"
            if why_not is None:
                fast = self._flash(query, key, value, causal, packed, dropout_p)
                if fast is not None:
                    self.kernel_used = "flash_attn"
                    return fast
            elif self.impl == "flash" and why_not not in _FLASH_FALLBACK_WARNED:
                _FLASH_FALLBACK_WARNED.add(why_not)
                log.warning("--attn_impl flash_attn: %s; using torch SDPA instead", why_not)
        if (self.impl == "auto" and causal and cp == 1 and packed is None
                and causal_blocks.applies(query, key, dropout_p)):
            usable, key_pad = causal_blocks.key_padding(attention_mask, query.size(1),
                                                        key.size(0))
            if usable:
                self.kernel_used = "cpu_blocks"
                out = causal_blocks.attention(query, key, value, self.softmax_scale, key_pad)
                return out.permute(1, 2, 0, 3)  # a view; forward's permute back is free
        self.kernel_used = "eager" if self.impl == "eager" else "sdpa"
        kernel = eager_attention if self.impl == "eager" else F.scaled_dot_product_attention

        sq, sk = query.size(0), key.size(0)
        device = query.device
        if cp > 1:
            q_pos = _held_positions(sk, cp, dist.get_rank(self.cp_group), thd_bounds, device)
        else:
            q_pos = torch.arange(sk - sq, sk, device=device)  # bottom-right for KV-cache decode
        k_pos = torch.arange(sk, device=device)

        q = query.permute(1, 2, 0, 3)  # [b, np, sq, hn]
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        gqa = q.size(1) != k.size(1)

        if packed is None and attention_mask is None and (not causal or (cp == 1 and sq == sk)):
            return kernel(
                q, k, v, attn_mask=None, dropout_p=dropout_p, is_causal=causal,
                scale=self.softmax_scale, enable_gqa=gqa,
            )

        allowed: Tensor | None = None  # broadcastable to [b, 1, sq, sk], True = may attend
        if causal:
            allowed = (k_pos[None, :] <= q_pos[:, None])[None, None]
        if packed is not None:
            seg_q = _segment_ids(_boundaries(packed, "q"), q_pos)
            seg_k = _segment_ids(_boundaries(packed, "kv"), k_pos)
            same = seg_q[:, None] == seg_k[None, :]
            if parents is not None:
                # shared-prefix pairs: a segment also sees its parent segment (the pair's prompt)
                par = parents.to(device=device, dtype=torch.long)
                par = torch.cat([par, par.new_full((1,), -1)])  # + the pad tail's segment
                same = same | (par[seg_q][:, None] == seg_k[None, :])
            same = same[None, None]
            allowed = same if allowed is None else allowed & same
        if attention_mask is not None:
            if attention_mask.dtype != torch.bool:
                raise TypeError(
                    f"attention_mask must be bool (True = masked out), got {attention_mask.dtype}"
                )
            if attention_mask.size(-1) != sk:
                raise ValueError(
                    f"attention_mask last dim {attention_mask.size(-1)} != key length {sk}"
                    + (" (under CP it must cover the full, global-order sequence)"
                       if cp > 1 else "")
                )
            keep = ~attention_mask.to(device)
            allowed = keep if allowed is None else allowed & keep

        assert allowed is not None
        # Rows with nothing to attend to would give NaN; attend anywhere, then zero them.
        # (No host sync: both steps are unconditional elementwise ops.)
        empty = ~allowed.any(dim=-1, keepdim=True)
        out = kernel(
            q, k, v, attn_mask=allowed | empty, dropout_p=dropout_p, is_causal=False,
            scale=self.softmax_scale, enable_gqa=gqa,
        )
        return out.masked_fill(empty, 0.0)

    def _flash_unusable(self, query: Tensor, key: Tensor, attention_mask: Tensor | None
                        ) -> str | None:
        """Why flash-attn cannot run this call (None: it can)."""
        if self.cp_size > 1:
            return "context parallelism uses the all-gather SDPA path"
        if attention_mask is not None:
            return "an explicit attention mask (padding) is not supported by flash-attn"
        if not query.is_cuda:
            return "tensors are not on a CUDA device"
        if query.dtype not in (torch.float16, torch.bfloat16):
            return f"flash-attn needs fp16/bf16, the model runs in {query.dtype}"
        if query.size(0) != key.size(0):
            return "query and key lengths differ (KV cache)"
        if importlib.util.find_spec("flash_attn") is None:
            return "flash-attn is not installed (pip install flash-attn on a CUDA box)"
        return None

    def _flash(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        causal: bool,
        packed: PackedSeqParams | None,
        dropout_p: float,
    ) -> Tensor | None:
        """flash-attn path (CUDA, fp16/bf16, CP=1) or None when it does not apply."""
        if not query.is_cuda or query.dtype not in (torch.float16, torch.bfloat16):
            return None
        if query.size(0) != key.size(0):
            return None
        try:
            from flash_attn import flash_attn_func, flash_attn_varlen_func
        except ImportError:
            return None
        if packed is None:
            out = flash_attn_func(  # [b, s, h, d]
                query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1),
                dropout_p=dropout_p, softmax_scale=self.softmax_scale, causal=causal,
            )
            return out.permute(0, 2, 1, 3)
        seq_len = query.size(0)
        cus = []
        for which in ("q", "kv"):
            cu = _boundaries(packed, which).to(device=query.device, dtype=torch.int32)
            if int(cu[-1]) < seq_len:  # tail padding is its own segment
                cu = torch.cat([cu, cu.new_tensor([seq_len])])
            cus.append(cu)
        max_q = int((cus[0][1:] - cus[0][:-1]).max())
        max_k = int((cus[1][1:] - cus[1][:-1]).max())
        out = flash_attn_varlen_func(  # [t, h, d]
            query.squeeze(1), key.squeeze(1), value.squeeze(1), cus[0], cus[1], max_q, max_k,
            dropout_p=dropout_p, softmax_scale=self.softmax_scale, causal=causal,
        )
        return out.unsqueeze(0).transpose(1, 2)  # [1, h, t, d]
