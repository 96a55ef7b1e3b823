"""Position ids for any family: 3 rows (mRoPE) always, HF-exact for the Qwen-VL families."""
from __future__ import annotations

import torch
from transformers import PretrainedConfig

from mvlm.data.mrope import get_rope_index, text_position_ids


def sample_position_ids(hf_config: PretrainedConfig, input_ids: torch.Tensor,
                        image_grid_thw: torch.Tensor | None = None,
                        video_grid_thw: torch.Tensor | None = None,
                        second_per_grid_ts=None) -> torch.Tensor:
    """[3, L] positions for one unpadded sample."""
    vision = getattr(hf_config, "vision_config", None)
    if vision is None or getattr(hf_config, "image_token_id", None) is None:
        return text_position_ids(int(input_ids.shape[-1]))
    tps = getattr(vision, "tokens_per_second", None) if hf_config.model_type == "qwen2_5_vl" \
        else None
    return get_rope_index(
        input_ids, image_token_id=hf_config.image_token_id,
        video_token_id=hf_config.video_token_id,
        spatial_merge_size=vision.spatial_merge_size, image_grid_thw=image_grid_thw,
        video_grid_thw=video_grid_thw, second_per_grid_ts=second_per_grid_ts,
        tokens_per_second=tps)


def batch_position_ids(hf_config: PretrainedConfig, input_ids: torch.Tensor,
                       image_grid_thw: torch.Tensor | None = None,
                       video_grid_thw: torch.Tensor | None = None) -> torch.Tensor:
    """[3, B, S] for an unpadded batch (each row one sample; images consumed in row order)."""
    rows = []
    img_i = vid_i = 0
    cfg = hf_config
    for row in input_ids:
        n_img = n_vid = 0
        if image_grid_thw is not None:
            n_img = _count_blocks(row, cfg.image_token_id, cfg)
        if video_grid_thw is not None:
            n_vid = _count_blocks(row, cfg.video_token_id, cfg)
        ig = image_grid_thw[img_i:img_i + n_img] if n_img else None
        vg = video_grid_thw[vid_i:vid_i + n_vid] if n_vid else None
        img_i += n_img
        vid_i += n_vid
        rows.append(sample_position_ids(cfg, row, ig, vg))
    return torch.stack(rows, dim=1)


def _count_blocks(row: torch.Tensor, token_id: int, cfg: PretrainedConfig) -> int:
    """Number of vision blocks: runs of placeholder tokens preceded by vision_start."""
    ids = row.tolist()
    start = getattr(cfg, "vision_start_token_id", None)
    return sum(1 for i in range(1, len(ids)) if ids[i] == token_id and ids[i - 1] == start)
