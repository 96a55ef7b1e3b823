"""Qwen3-VL: Qwen3 decoder (q/k-norm) + a ViT with learned, interpolated position embeddings and
a 2x2 patch merger, three Qwen3-VL specifics on top of Qwen2.5-VL:

* DeepStack: the ViT layers in ``vision_config.deepstack_visual_indexes`` each feed a merger of
  their own whose output is added to the hidden states after decoder layers 0, 1, ... at the
  image/video positions (:mod:`mvlm.models.deepstack`; the tower returns both, concatenated);
* interleaved mRoPE (``rope_parameters.mrope_interleaved``): rotary channels cycle through
  time/height/width instead of lying in three blocks -- expressed as a per-channel section list
  for Megatron-Core's multimodal rotary module (:func:`interleaved_sections`);
* videos are cut into frames, each frame its own ``<t seconds><|vision_start|>..<|vision_end|>``
  block with a text timestamp (``template.py``), so positions treat every frame as an image.

Files: ``weights.py`` (decoder table + ViT kept whole), ``template.py``, ``tiny.py``.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from mvlm.models.qwen2_vl import IMAGE, VIDEO
from mvlm.models.registry import FamilySpec, VisionSpec, register

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PretrainedConfig

    from mvlm.models.gpt import TextArch

MEDIA = (IMAGE, VIDEO)
ALIGNER_PREFIXES = ("vision_model.tower.merger.", "vision_model.tower.deepstack_merger_list.")
PEFT_TOWER_PREFIXES = ("model.visual.",)


def interleaved_sections(mrope_section: list[int]) -> list[int]:
    """Megatron-Core's ``mrope_section`` list that reproduces HF's interleaved mRoPE.

    HF gives rotary channel j (of head_dim/2) the height position if j % 3 == 1 and
    j < 3 * sections[1], the width position if j % 3 == 2 and j < 3 * sections[2], time
    otherwise. Megatron-Core splits the channels by the list and gives split i the position row
    i % 3, so one channel per split, with empty splits to step to the right row, says the same;
    the list is padded to a multiple of 3 because Megatron-Core repeats it for the second half
    of the (non-interleaved) rotary channels."""
    t, h, w = (int(x) for x in mrope_section)
    out: list[int] = []
    for j in range(t + h + w):
        row = 1 if (j % 3 == 1 and j < 3 * h) else 2 if (j % 3 == 2 and j < 3 * w) else 0
        if out and len(out) % 3 == (row + 1) % 3:
            out[-1] += 1  # same row as the channel before: widen its split
            continue
        while len(out) % 3 != row:
            out.append(0)
        out.append(1)
    while len(out) % 3:
        out.append(0)
    return out


def qwen3_vl_text_arch(cfg: PretrainedConfig) -> TextArch:
    """The Qwen3 decoder of ``text_config`` with Qwen3-VL's (interleaved) mRoPE."""
    from mvlm.models.hf_text import llama_style_arch

    tc = getattr(cfg, "text_config", cfg)
    arch = llama_style_arch(tc, qk_layernorm=True)
    arch.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
    if not arch.mrope_section:
        raise ValueError("Qwen3-VL config lacks text_config.rope_parameters.mrope_section: the "
                         "checkpoint's config.json is incomplete")
    if sum(arch.mrope_section) != arch.head_dim // 2:
        raise ValueError(f"rope_parameters.mrope_section {arch.mrope_section} must sum to "
                         f"head_dim / 2 = {arch.head_dim // 2}")
    # HF's Qwen3-VL rotary module interleaves whatever ``mrope_interleaved`` says
    arch.mrope_section = interleaved_sections(arch.mrope_section)
    return arch


def deepstack_levels(cfg: PretrainedConfig) -> int:
    return len(getattr(cfg.vision_config, "deepstack_visual_indexes", None) or ())


def position_ids(hf_config: PretrainedConfig, input_ids: torch.Tensor,
                 media: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Qwen3-VL mRoPE: as Qwen2-VL's, with each video frame its own block (t = 1), the way the
    template lays frames out between timestamps; no temporal scaling."""
    import torch

    from mvlm.models.qwen2_vl import mrope_position_ids

    media = dict(media)
    media.pop("second_per_grid_ts", None)
    grid = media.get("video_grid_thw")
    if grid is not None:
        frames = torch.repeat_interleave(grid, grid[:, 0], dim=0)
        frames[:, 0] = 1
        media["video_grid_thw"] = frames
    return mrope_position_ids(hf_config, input_ids, media)


def hf_forward_inputs(hf_config: PretrainedConfig, batch: Mapping[str, Any]) -> dict[str, Any]:
    """The HF forward's inputs: our positions, the media, and the token-type ids (1 image,
    2 video) Qwen3-VL's processor returns."""
    ids = batch["input_ids"]
    kwargs: dict[str, Any] = {"input_ids": ids}
    if "position_ids" in batch:
        kwargs["position_ids"] = batch["position_ids"]
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        if key in batch:
            kwargs[key] = batch[key]
    kwargs["mm_token_type_ids"] = ((ids == hf_config.image_token_id).int()
                                   + 2 * (ids == hf_config.video_token_id).int())
    return kwargs


def _vision(cfg: PretrainedConfig, dtype: torch.dtype, device: str) -> nn.Module:
    from mvlm.models.qwen3_vl.tower import build_tower

    return build_tower(cfg, dtype, device)


QWEN3_VL = register(FamilySpec(
    name="qwen3_vl",
    model_types=("qwen3_vl",),
    hf_model_class="Qwen3VLForConditionalGeneration",
    text_arch=qwen3_vl_text_arch,
    weights="mvlm.models.qwen3_vl.weights:mappings",
    template="mvlm.models.qwen3_vl.template:Qwen3VLTemplate",
    tiny="mvlm.models.qwen3_vl.tiny:TINY",
    vision=VisionSpec(build=_vision, media=MEDIA, aligner_prefixes=ALIGNER_PREFIXES,
                      peft_tower_prefixes=PEFT_TOWER_PREFIXES,
                      deepstack_levels=deepstack_levels),
    position_ids=position_ids,
    hf_forward_inputs=hf_forward_inputs,
))
