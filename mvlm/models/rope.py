"""Rotary position embedding variants: default, linear, llama3 and YaRN frequencies.

Why this exists: mvlm runs every family through Megatron-Core's multimodal rotary module (three
position rows; text-only models use three equal rows) so packed samples restart their positions
and CP slices them one way. That module knows only the default frequencies ``1 / theta^(2i/d)``.
The scaled variants change nothing but those inverse frequencies (and, for YaRN, a factor on
cos/sin), so :func:`rope_inv_freq` computes them with Megatron-Core's own helpers (the llama3 rule
of ``RotaryEmbedding._apply_scaling``, YaRN's correction range and ramp) and
``mvlm.models.gpt.build_gpt`` installs the result on the rotary module. YaRN's cos/sin factor is
applied by Megatron-Core's attention from the ``yarn_*`` config fields.

``partial_rotary_factor`` maps to Megatron-Core's ``rotary_percent``: the first
``int(head_dim * factor)`` channels of each head rotate, the rest pass through (HF's split too).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class RopeConfigError(ValueError):
    """An HF rope configuration mvlm cannot reproduce exactly; the message names the field."""


@dataclass(frozen=True)
class RopeScaling:
    """The scaling part of HF's ``rope_parameters`` (``rope_theta`` lives in ``TextArch``)."""

    rope_type: str = "default"
    factor: float = 1.0
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise RopeConfigError(
                f"rope_parameters.rope_type={self.rope_type!r} is not supported: mvlm reproduces "
                f"{', '.join(ROPE_TYPES)} (Megatron-Core has no dynamic/longrope rotary module)")
        if self.rope_type in ("llama3", "yarn") and not self.original_max_position_embeddings:
            raise RopeConfigError(
                f"rope_parameters.rope_type={self.rope_type!r} needs "
                "rope_parameters.original_max_position_embeddings in config.json")

    @property
    def attention_factor(self) -> float:
        """YaRN's factor on cos/sin (Megatron-Core's concentration factor); 1 otherwise."""
        if self.rope_type != "yarn":
            return 1.0
        from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
            _yarn_get_concentration_factor,
        )

        return _yarn_get_concentration_factor(self.factor, self.mscale, self.mscale_all_dim)


def default_inv_freq(theta: float, rot_dim: int) -> torch.Tensor:
    """``1 / theta^(2i/d)`` in fp32, the arithmetic of Megatron-Core's and HF's rotary modules."""
    return 1.0 / (theta ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim))


def rope_inv_freq(theta: float, rot_dim: int, scaling: RopeScaling) -> torch.Tensor:
    """Inverse frequencies [rot_dim / 2] of one variant, on the CPU, fp32."""
    base = default_inv_freq(theta, rot_dim)
    kind = scaling.rope_type
    if kind == "default":
        return base
    if kind == "linear":
        # Positions / factor == frequencies / factor; HF divides the frequencies, so do we (the
        # two round differently, and Megatron's seq_len_interpolation_factor scales positions).
        return base / scaling.factor
    if kind == "llama3":
        from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

        # Megatron-Core's llama 3.x rule, called with this checkpoint's parameters (its
        # constructor only forwards ``factor`` and keeps 1 / 4 / 8192 for the rest).
        return RotaryEmbedding._apply_scaling(
            None, base, factor=scaling.factor, low_freq_factor=scaling.low_freq_factor,
            high_freq_factor=scaling.high_freq_factor,
            original_max_position_embeddings=scaling.original_max_position_embeddings)
    return _yarn_inv_freq(theta, rot_dim, scaling)


def _yarn_inv_freq(theta: float, rot_dim: int, s: RopeScaling) -> torch.Tensor:
    """YaRN: interpolated (``/ factor``) frequencies for long wavelengths, the original ones for
    short wavelengths, a linear ramp between; built from Megatron-Core's YaRN helpers."""
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
        _yarn_find_correction_range,
        _yarn_linear_ramp_mask,
    )

    pos_freqs = theta ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (s.factor * pos_freqs)
    low, high = _yarn_find_correction_range(s.beta_fast, s.beta_slow, rot_dim, theta,
                                            s.original_max_position_embeddings,
                                            round_to_int=s.truncate)
    extrapolation_share = 1 - _yarn_linear_ramp_mask(low, high, rot_dim // 2, device="cpu")
    return interpolation * (1 - extrapolation_share) + extrapolation * extrapolation_share


def rope_from_hf(cfg) -> tuple[float, RopeScaling, float, list[int] | None]:
    """(theta, scaling, partial_rotary_factor, mrope_section) read from an HF text config.

    transformers 5 keeps everything in ``rope_parameters`` (older configs: ``rope_scaling`` plus a
    top-level ``rope_theta`` / ``partial_rotary_factor``); both spellings are read."""
    rp = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    theta = float(rp.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
    partial = float(rp.get("partial_rotary_factor",
                           getattr(cfg, "partial_rotary_factor", None) or 1.0))
    kind = rp.get("rope_type", rp.get("type", "default"))
    mrope = rp.get("mrope_section")
    if kind == "mrope":  # Qwen2-VL's older spelling of default RoPE with sections
        kind = "default"
    if kind == "yarn" and rp.get("attention_factor") is not None:
        scaling = _yarn_from_hf(rp, cfg)
        want = float(rp["attention_factor"])
        if not math.isclose(scaling.attention_factor, want, rel_tol=0, abs_tol=0):
            raise RopeConfigError(
                f"rope_parameters.attention_factor={want} differs from YaRN's own "
                f"{scaling.attention_factor} for factor={scaling.factor}: Megatron-Core derives "
                "it from factor / mscale / mscale_all_dim; remove attention_factor or set those")
        return theta, scaling, partial, mrope
    if kind == "yarn":
        return theta, _yarn_from_hf(rp, cfg), partial, mrope
    # rope_type 'default' ignores a 'factor' field, as transformers does
    scaling = RopeScaling(
        rope_type=kind,
        factor=float(rp.get("factor", 1.0)),
        low_freq_factor=float(rp.get("low_freq_factor", 1.0)),
        high_freq_factor=float(rp.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=rp.get("original_max_position_embeddings"),
    )
    return theta, scaling, partial, mrope


def _yarn_from_hf(rp: dict, cfg) -> RopeScaling:
    orig = rp.get("original_max_position_embeddings")
    if not orig:
        raise RopeConfigError("rope_parameters.rope_type='yarn' needs "
                              "rope_parameters.original_max_position_embeddings in config.json")
    factor = rp.get("factor") or cfg.max_position_embeddings / orig  # HF's DeepSeek-V3 rule
    # HF uses the mscale ratio only when both are set and non-zero; Megatron-Core when both are
    # not None: pass None unless HF would use them.
    both = bool(rp.get("mscale")) and bool(rp.get("mscale_all_dim"))
    return RopeScaling(
        rope_type="yarn", factor=float(factor), original_max_position_embeddings=int(orig),
        beta_fast=float(rp.get("beta_fast") or 32.0), beta_slow=float(rp.get("beta_slow") or 1.0),
        mscale=float(rp["mscale"]) if both else None,
        mscale_all_dim=float(rp["mscale_all_dim"]) if both else None,
        truncate=bool(rp.get("truncate", True)))
