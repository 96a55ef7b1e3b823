"""Qwen2-VL: Qwen2 language model + ViT with 2-D RoPE and a 2x2 patch merger; 3-D mRoPE.

Images and videos enter as ``<|vision_start|><|image_pad|>*N<|vision_end|>`` (``template.py``
expands the single pad to N = t*h*w/merge^2); the tower's merged features replace the pads in
the text embeddings (``VisionSpec.merge`` = None: scatter at the placeholders); positions are
Qwen's 3-D mRoPE (``mrope_position_ids``). Qwen2.5-VL reuses all of it but the tower.
Files: ``weights.py`` (decoder table + ViT kept whole), ``template.py``, ``tiny.py``.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from mvlm.models.qwen2 import qwen2_text_arch
from mvlm.models.registry import FamilySpec, MediaKind, VisionSpec, register

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PretrainedConfig

    from mvlm.models.gpt import TextArch

# The batch keys of Qwen-VL media: what the template writes, the collator concatenates and the
# tower reads (also HF's processor output names, so processor outputs pass through unchanged).
IMAGE = MediaKind("image", token_attr="image_token_id", features_key="pixel_values",
                  grid_key="image_grid_thw", dtypes={"image_grid_thw": "long"})
VIDEO = MediaKind("video", token_attr="video_token_id", features_key="pixel_values_videos",
                  grid_key="video_grid_thw", extra_keys=("second_per_grid_ts",),
                  dtypes={"video_grid_thw": "long"})
MEDIA = (IMAGE, VIDEO)
# The patch merger (aligner) inside the HF tower module; the rest of the tower is the ViT.
ALIGNER_PREFIXES = ("vision_model.tower.merger.",)
# transformers 5's module tree nests the decoder and the ViT under ``model.``; the hub layout
# (what the weight table names, what save_pretrained writes) does not. PEFT keys follow the tree.
MODULE_TREE_PREFIXES = (("model.language_model.", "model."), ("model.visual.", "visual."))
# Where the tower sits in the transformers model (PEFT module paths).
PEFT_TOWER_PREFIXES = ("model.visual.",)


def text_config(cfg: PretrainedConfig) -> PretrainedConfig:
    return getattr(cfg, "text_config", cfg)


def vl_text_arch(cfg: PretrainedConfig) -> TextArch:
    tc = text_config(cfg)
    arch = qwen2_text_arch(tc)
    arch.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False)
                                    or getattr(tc, "tie_word_embeddings", False))
    if not arch.mrope_section:
        raise ValueError("Qwen-VL config lacks rope_parameters.mrope_section: the checkpoint's "
                         "config.json is incomplete")
    return arch


def mrope_position_ids(hf_config: PretrainedConfig, input_ids: torch.Tensor,
                       media: Mapping[str, torch.Tensor],
                       tokens_per_second: float | None = None) -> torch.Tensor:
    """[3, B, S] Qwen 3-D positions for unpadded rows; each row's images/videos are the next
    blocks (runs of pads opened by ``<|vision_start|>``) in batch order. Video time uses
    ``second_per_grid_ts`` when the batch has it (1 s per grid otherwise, as HF)."""
    import torch

    from mvlm.data.mrope import get_rope_index, text_position_ids

    cfg = hf_config
    vision = getattr(cfg, "vision_config", None)
    image_grid, video_grid = media.get("image_grid_thw"), media.get("video_grid_thw")
    video_seconds = media.get("second_per_grid_ts")
    rows = []
    img_i = vid_i = 0
    for row in input_ids:
        if vision is None or getattr(cfg, "image_token_id", None) is None:
            rows.append(text_position_ids(int(row.shape[-1])))
            continue
        n_img = _count_blocks(row, cfg.image_token_id, cfg) if image_grid is not None else 0
        n_vid = _count_blocks(row, cfg.video_token_id, cfg) if video_grid is not None else 0
        ig = image_grid[img_i:img_i + n_img] if n_img else None
        vg = video_grid[vid_i:vid_i + n_vid] if n_vid else None
        vs = video_seconds[vid_i:vid_i + n_vid] if n_vid and video_seconds is not None else None
        img_i += n_img
        vid_i += n_vid
        rows.append(get_rope_index(
            row, image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
            spatial_merge_size=vision.spatial_merge_size, image_grid_thw=ig, video_grid_thw=vg,
            second_per_grid_ts=vs, tokens_per_second=tokens_per_second))
    return torch.stack(rows, dim=1)


def _count_blocks(row: torch.Tensor, token_id: int, cfg: PretrainedConfig) -> int:
    """Number of vision blocks: runs of placeholder tokens preceded by vision_start."""
    ids = row.tolist()
    start = getattr(cfg, "vision_start_token_id", None)
    return sum(1 for i in range(1, len(ids)) if ids[i] == token_id and ids[i - 1] == start)


def hf_forward_inputs(hf_config: PretrainedConfig, batch: Mapping[str, Any]) -> dict[str, Any]:
    """The HF Qwen-VL forward's inputs: explicit (our) positions, and the token-type mask
    transformers 5 wants beside pixel_values."""
    kwargs = {"input_ids": batch["input_ids"]}
    if "pixel_values" in batch:
        kwargs.update(pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                      position_ids=batch["position_ids"])
        kwargs["mm_token_type_ids"] = (batch["input_ids"] == hf_config.image_token_id).int()
    return kwargs


def _vision(cfg: PretrainedConfig, dtype: torch.dtype, device: str) -> nn.Module:
    from mvlm.models.vision import build_hf_vision

    return build_hf_vision("transformers.models.qwen2_vl.modeling_qwen2_vl",
                           "Qwen2VisionTransformerPretrainedModel", cfg.vision_config, dtype,
                           device)


QWEN2_VL = register(FamilySpec(
    name="qwen2_vl",
    model_types=("qwen2_vl",),
    hf_model_class="Qwen2VLForConditionalGeneration",
    text_arch=vl_text_arch,
    weights="mvlm.models.qwen2_vl.weights:mappings",
    template="mvlm.models.qwen2_vl.template:Qwen2VLTemplate",
    tiny="mvlm.models.qwen2_vl.tiny:TINY",
    vision=VisionSpec(build=_vision, media=MEDIA, aligner_prefixes=ALIGNER_PREFIXES,
                      peft_tower_prefixes=PEFT_TOWER_PREFIXES),
    position_ids=mrope_position_ids,
    hf_forward_inputs=hf_forward_inputs,
    module_tree_prefixes=MODULE_TREE_PREFIXES,
))
