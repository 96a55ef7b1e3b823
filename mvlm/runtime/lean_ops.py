"""Four Megatron-Core helpers without their copies or extra work: full-width RoPE, the SwiGLU of
a gated MLP, in-place gradient clipping and the cross entropy's row maximum.

They change where results are stored or how a value is found, not what is computed; every value
stays equal.

* RoPE (``rope_utils._apply_rotary_pos_emb_bshd``): Megatron splits the input into the rotated
  part ``t[..., :rot_dim]`` and a pass-through ``t[..., rot_dim:]`` and concatenates them again.
  When the rotary dimension is the whole head (every model mvlm ships except partial-rotary
  ones), the pass-through is empty: the forward ``cat`` is a copy of the result, and the backward
  builds two zero-filled gradients of the input's full size (one per slice) and adds them. With
  ``rot_dim == t.shape[-1]`` the rotation is returned directly: the same arithmetic, the
  gradient the same values (``g`` instead of ``g + 0``: only a ``-0.0`` keeps its sign). The
  ``cos``/``sin`` tables of one ``freqs`` tensor are computed once and reused by the query, the
  key and every layer of the pass (same operators on the same input: the same bits), as long as
  ``freqs`` is the same, unmodified tensor and needs no gradient. The non-interleaved rotation
  itself runs as :class:`RotateHalf`: Megatron's ``t * cos + cat(-t2, t1) * sin`` built a negated
  half, a rotated copy of ``t`` and two more full-size temporaries, and autograd's backward of the
  chunk concatenated the half gradients (``aten::cat``, 16 of a bench step's 23 calls); the
  function writes both halves into the ``t * cos`` (backward: ``g * cos``) result in place, with
  the same products and sums.
* SwiGLU (``MLP.forward`` without a fused activation, i.e. without TE/Apex on CPU): Megatron
  splits ``linear_fc1``'s output with ``torch.chunk``, adds ``glu_linear_offset`` (0.0: a full
  copy of the linear half) and multiplies; autograd's backward of the chunk concatenates the two
  half gradients into a new tensor (``aten::cat`` of the layer's widest activation, the most
  expensive copy of a CPU step: 10-15 ms of a 0.7 s bench step). :class:`SwiGLU` computes the
  same operators (``silu``, ``mul``; backward ``mul`` and ``silu_backward`` as autograd runs
  them) and writes the two half gradients straight into one tensor; it saves the input and the
  activation instead of the input plus the offset copy. Taken only for the plain case (silu,
  gated, no clamp, zero offset, no per-token scale, not TE's activation); anything else runs
  Megatron's forward. Where ``linear_fc1`` itself qualifies (:func:`gated_mlp.applies`: plain
  TP1 CPU layer on wgrad's direct path), the linear and the SwiGLU run as one node,
  :class:`gated_mlp.Fc1SwiGLU`, with the gate and up halves in contiguous tensors.
* Clipping (``clip_grads.multi_tensor_scale_impl`` without Apex or TE): Megatron scales each
  gradient through a temporary, ``g.copy_(g * coeff)``; ``clip_grad_by_total_norm_fp32`` passes
  the same list as source and destination, and then the scale runs in place, ``g.mul_(coeff)``:
  the same multiplication kernel, no temporary of the gradient's size. Other callers (distinct
  source and destination lists) get Megatron's function.
* Cross-entropy row maximum (``VocabParallelCrossEntropy.calculate_logits_max``): Megatron takes
  ``torch.max(logits, dim=-1)[0]``, which also builds the argmax indices it throws away; on CPU
  that is 16x slower than ``torch.amax`` (1.78 vs 0.11 ms on the bench's [256, 4, 1024] fp32
  logits). A maximum is exact, so ``amax`` gives the same values (NaN rows stay NaN).

Installed by :func:`install` from :func:`mvlm.train.optim.wrap_ddp`.
"""
from __future__ import annotations

import functools
from typing import Any

import torch

from mvlm.runtime import gated_mlp

_INSTALLED = False
ORIGINALS: dict[str, Any] = {}  # what install replaced (tests run the unpatched path with them)
_TABLES: dict[str, Any] = {}  # the last freqs' (key, cos, sin): one entry


def cos_sin(freqs: torch.Tensor, mscale: float, dtype: torch.dtype) -> tuple[torch.Tensor,
                                                                              torch.Tensor]:
    """Megatron's ``(cos(freqs) * mscale).to(dtype)`` and the ``sin`` one, cached for the last
    ``freqs`` (same object, same version counter, no autograd)."""
    key = (id(freqs), freqs._version, float(mscale), dtype)
    hit = _TABLES.get("last")
    if hit is not None and hit[0] == key and hit[1] is freqs:
        return hit[2], hit[3]
    cos_ = (torch.cos(freqs) * mscale).to(dtype)
    sin_ = (torch.sin(freqs) * mscale).to(dtype)
    if not freqs.requires_grad and not torch.is_inference_mode_enabled():
        _TABLES["last"] = (key, freqs, cos_, sin_)
    return cos_, sin_


def _full_width_rope(original: Any) -> Any:
    from megatron.core.models.common.embeddings import rope_utils

    @functools.wraps(original)
    def rope(t: torch.Tensor, freqs: torch.Tensor, rotary_interleaved: bool = False,
             multi_latent_attention: bool = False, mscale: float = 1.0) -> torch.Tensor:
        if multi_latent_attention or freqs.shape[-1] != t.shape[-1]:
            return original(t, freqs, rotary_interleaved=rotary_interleaved,
                            multi_latent_attention=multi_latent_attention, mscale=mscale)
        cos_, sin_ = cos_sin(freqs, mscale, t.dtype)
        if not rotary_interleaved and not cos_.requires_grad and _row_major(t) and \
                _broadcasts_to(cos_.shape, t.shape):
            return RotateHalf.apply(t, cos_, sin_)
        return (t * cos_) + (rope_utils._rotate_half(t, rotary_interleaved) * sin_)

    rope._mvlm_full_width = True  # type: ignore[attr-defined]
    return rope


def _broadcasts_to(small: torch.Size, shape: torch.Size) -> bool:
    """Whether ``small`` broadcasts to exactly ``shape`` (``torch.broadcast_shapes(shape, small)
    == shape`` without its symbolic-shape machinery: ~200 us a call, 8 calls a bench step)."""
    return len(small) <= len(shape) and all(
        a == 1 or a == b for a, b in zip(reversed(small), reversed(shape)))


def _row_major(t: torch.Tensor) -> bool:
    """Whether ``t``'s strides never grow from one dimension to the next (size-1 dimensions
    aside): then elementwise results on it come out contiguous, as Megatron's expression's do,
    so :class:`RotateHalf` hands the next operator the same layout."""
    strides = [st for st, n in zip(t.stride(), t.shape) if n != 1]
    return all(a >= b for a, b in zip(strides, strides[1:]))


class RotateHalf(torch.autograd.Function):
    """Megatron's non-interleaved rotation ``t * cos + cat(-t2, t1) * sin`` (``t1, t2`` the
    halves of the last dimension) without the rotated copy of ``t`` in the forward and without
    autograd's negated half and concatenation in the backward.

    Forward: ``t * cos``, then its first half minus ``t2 * sin1`` and its second half plus
    ``t1 * sin2``, each in place; Megatron adds ``(-t2) * sin1`` and ``t1 * sin2``, the same
    values (a float product's sign never changes its rounding, ``a + (-b)`` is ``a - b``).
    Backward: ``g * cos``, its first half plus ``g2 * sin2`` and its second half minus
    ``g1 * sin1``: what autograd sums from the two branches (the product's gradient and the
    split/neg/cat chain's), element by element. ``cos``/``sin`` must not need gradients (RoPE
    tables never do) and must broadcast to ``t``'s shape."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, cos_: torch.Tensor,
                sin_: torch.Tensor) -> torch.Tensor:
        out = torch.mul(t, cos_)
        t1, t2 = torch.chunk(t, 2, dim=-1)
        sin1, sin2 = torch.chunk(sin_, 2, dim=-1)
        out1, out2 = torch.chunk(out, 2, dim=-1)
        out1.sub_(t2 * sin1)
        out2.add_(t1 * sin2)
        ctx.save_for_backward(cos_, sin_)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        cos_, sin_ = ctx.saved_tensors
        out = torch.mul(grad, cos_)
        g1, g2 = torch.chunk(grad, 2, dim=-1)
        sin1, sin2 = torch.chunk(sin_, 2, dim=-1)
        out1, out2 = torch.chunk(out, 2, dim=-1)
        out1.add_(g2 * sin2)
        out2.sub_(g1 * sin1)
        return out, None, None


def _scale_in_place(original: Any) -> Any:
    @functools.wraps(original)
    def scale(chunk_size: int, noop_flag: Any, tensor_lists: list, factor: Any) -> None:
        src, dst = tensor_lists[0], tensor_lists[1]
        if src is not dst:
            return original(chunk_size, noop_flag, tensor_lists, factor)
        for g in dst:
            g.mul_(factor)
        return None

    scale._mvlm_in_place = True  # type: ignore[attr-defined]
    return scale


class SwiGLU(torch.autograd.Function):
    """``silu(x1) * x2`` for ``x1, x2 = x.chunk(2, -1)``, its input gradient written as one
    tensor (no concatenation of the halves)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        gate, lin = torch.chunk(x, 2, dim=-1)
        act = torch.nn.functional.silu(gate)
        ctx.save_for_backward(x, act)
        return act * lin

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        x, act = ctx.saved_tensors
        gate, lin = torch.chunk(x, 2, dim=-1)
        out = torch.empty(x.shape, dtype=grad.dtype, device=grad.device)
        d_gate, d_lin = torch.chunk(out, 2, dim=-1)
        # autograd's MulBackward0 (grad * other, grad * self) and SiluBackward0, same kernels
        torch.ops.aten.silu_backward.grad_input(grad * lin, gate, grad_input=d_gate)
        torch.mul(grad, act, out=d_lin)
        return out


def _plain_swiglu(mlp: Any, per_token_scale: Any) -> bool:
    c = mlp.config
    return (per_token_scale is None and not c.use_te_activation_func
            and not c.bias_activation_fusion and c.gated_linear_unit
            and mlp.activation_func is torch.nn.functional.silu
            and c.activation_func_clamp_value is None and c.glu_linear_offset == 0.0)


def _lean_mlp_forward(original: Any) -> Any:
    @functools.wraps(original)
    def forward(self: Any, hidden_states: torch.Tensor, per_token_scale: Any = None,
                **kwargs: Any) -> Any:
        if not _plain_swiglu(self, per_token_scale):
            return original(self, hidden_states, per_token_scale=per_token_scale, **kwargs)
        if gated_mlp.applies(self.linear_fc1, hidden_states):
            return self.linear_fc2(gated_mlp.Fc1SwiGLU.apply(hidden_states,
                                                              self.linear_fc1.weight))
        inter, bias = self.linear_fc1(hidden_states)
        if bias is not None:
            inter = inter + bias
        return self.linear_fc2(SwiGLU.apply(inter))

    forward._mvlm_lean = True  # type: ignore[attr-defined]
    return forward


def _logits_max(vocab_parallel_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Megatron's ``calculate_logits_max`` with ``amax``: the fp32 logits and their row maxima."""
    vocab_parallel_logits = vocab_parallel_logits.float()
    return vocab_parallel_logits, torch.amax(vocab_parallel_logits, dim=-1)


def install() -> None:
    """Patch the four Megatron-Core functions (once per process)."""
    global _INSTALLED
    if _INSTALLED:
        return
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.optimizer import clip_grads
    from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy
    from megatron.core.transformer.mlp import MLP
    from megatron.core.utils import local_multi_tensor_scale

    ORIGINALS.update(rope=rope_utils._apply_rotary_pos_emb_bshd,
                     scale=clip_grads.multi_tensor_scale_impl, mlp_forward=MLP.forward,
                     logits_max=VocabParallelCrossEntropy.calculate_logits_max)
    VocabParallelCrossEntropy.calculate_logits_max = staticmethod(_logits_max)
    rope_utils._apply_rotary_pos_emb_bshd = _full_width_rope(ORIGINALS["rope"])
    MLP.forward = _lean_mlp_forward(ORIGINALS["mlp_forward"])
    if ORIGINALS["scale"] is local_multi_tensor_scale:  # not Apex's / TE's kernel
        clip_grads.multi_tensor_scale_impl = _scale_in_place(local_multi_tensor_scale)
    _INSTALLED = True
