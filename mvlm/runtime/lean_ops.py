"""Two Megatron-Core helpers without their copies: full-width RoPE and in-place gradient clipping.

Both change where results are stored, not what is computed; every value stays equal.

* RoPE (``rope_utils._apply_rotary_pos_emb_bshd``): Megatron splits the input into the rotated
  part ``t[..., :rot_dim]`` and a pass-through ``t[..., rot_dim:]`` and concatenates them again.
  When the rotary dimension is the whole head (every model mvlm ships except partial-rotary
  ones), the pass-through is empty: the forward ``cat`` is a copy of the result, and the backward
  builds two zero-filled gradients of the input's full size (one per slice) and adds them. With
  ``rot_dim == t.shape[-1]`` the rotation is returned directly: the same arithmetic, the
  gradient the same values (``g`` instead of ``g + 0``: only a ``-0.0`` keeps its sign). The
  ``cos``/``sin`` tables of one ``freqs`` tensor are computed once and reused by the query, the
  key and every layer of the pass (same operators on the same input: the same bits), as long as
  ``freqs`` is the same, unmodified tensor and needs no gradient.
* Clipping (``clip_grads.multi_tensor_scale_impl`` without Apex or TE): Megatron scales each
  gradient through a temporary, ``g.copy_(g * coeff)``; ``clip_grad_by_total_norm_fp32`` passes
  the same list as source and destination, and then the scale runs in place, ``g.mul_(coeff)``:
  the same multiplication kernel, no temporary of the gradient's size. Other callers (distinct
  source and destination lists) get Megatron's function.

Installed by :func:`install` from :func:`mvlm.train.optim.wrap_ddp`.
"""
from __future__ import annotations

import functools
from typing import Any

import torch

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
        return (t * cos_) + (rope_utils._rotate_half(t, rotary_interleaved) * sin_)

    rope._mvlm_full_width = True  # type: ignore[attr-defined]
    return rope


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


def install() -> None:
    """Patch the two module-level functions (once per process)."""
    global _INSTALLED
    if _INSTALLED:
        return
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.optimizer import clip_grads
    from megatron.core.utils import local_multi_tensor_scale

    ORIGINALS.update(rope=rope_utils._apply_rotary_pos_emb_bshd,
                     scale=clip_grads.multi_tensor_scale_impl)
    rope_utils._apply_rotary_pos_emb_bshd = _full_width_rope(ORIGINALS["rope"])
    if ORIGINALS["scale"] is local_multi_tensor_scale:  # not Apex's / TE's kernel
        clip_grads.multi_tensor_scale_impl = _scale_in_place(local_multi_tensor_scale)
    _INSTALLED = True
