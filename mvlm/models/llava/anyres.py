"""Any-resolution LLaVA (LLaVA-NeXT, LLaVA-OneVision): tiles per image, a newline embedding, and
(OneVision) pooled video frames -- shared by ``mvlm/models/llava_next`` and
``mvlm/models/llava_onevision``.

The processor cuts each image into a base tile (the whole image resized) plus the tiles of the
best-fitting ``image_grid_pinpoints`` resolution, all of the ViT's ``image_size``. The model
runs the ViT and projector on every tile independently, then, per image, lays the tiles' features
out on the full-resolution grid, removes the rows/columns that only cover the processor's
padding ("unpad"), appends ``image_newline`` after every row, and puts the base tile first.
OneVision also shrinks an unpadded grid larger than ``anyres_max_N`` base tiles (bilinear), and
pools each video frame's feature map 2x2 with one newline after the whole video.

Batch layout (what the template writes, the collator concatenates, the model reads):
``pixel_values [tiles, 3, H, W]`` -- HF's padded ``[images, max_tiles, 3, H, W]`` without the
padding -- with ``image_grid_thw [images, 3] = (tiles, 1, 1)`` saying how many rows each image
owns (so the vision split, RL media slicing and the encoded-dataset storage divide rows by image
exactly as for Qwen-VL's grids) and ``image_sizes [images, 2]`` (original height, width: HF's
key, read by the unpad step). Videos: ``pixel_values_videos [frames, 3, H, W]`` with
``video_grid_thw = (frames, 1, 1)``. A OneVision image of a multi-image row has one tile (the
processor does not tile those), which is how the model tells it apart.

The tower (:class:`AnyresTower`) is the per-row part (ViT + projector, splittable over TP x CP
ranks); the per-image packing runs in the family's ``VisionSpec.merge`` on every rank after the
features are gathered. Packing, unpadding and pooling call transformers' own functions on the
same tensors, so the numerics are transformers'.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from transformers import AutoModel, PretrainedConfig

from mvlm.models.llava.anyres_kinds import ANYRES_IMAGE, FRAMES_VIDEO
from mvlm.models.llava.tower import LlavaTower
from mvlm.models.registry import MediaKind
from mvlm.models.vision import media_features, scatter_features, vision_attn_impl


class AnyresTower(LlavaTower):
    """forward(rows [n, 3, H, W] (or flattened [n, 3*H*W]), grid) -> projected features
    [n * tokens_per_tile, text_hidden] of every tile / frame, in row order. Holds
    ``image_newline`` (used by the merge) and the HF config that HF's packing reads."""

    def __init__(self, vision_tower: nn.Module, projector: nn.Module, cfg: PretrainedConfig
                 ) -> None:
        super().__init__(vision_tower, projector, cfg.vision_feature_layer,
                         cfg.vision_feature_select_strategy)
        self.image_newline = nn.Parameter(torch.zeros(cfg.text_config.hidden_size,
                                                      dtype=projector.linear_1.weight.dtype))
        self.config = cfg  # read by transformers' pack_image_features / apply_pooling

    @classmethod
    def build_with(cls, projector_cls: type[nn.Module], cfg: PretrainedConfig,
                   dtype: torch.dtype, device: str) -> AnyresTower:
        cfg.vision_config._attn_implementation = vision_attn_impl(device)
        with torch.device("cpu" if device == "cpu" else device):
            tower = AutoModel.from_config(cfg.vision_config, dtype=dtype)
            projector = projector_cls(cfg).to(dtype)
        return cls(tower, projector, cfg)

    def forward(self, pixel_values: torch.Tensor, grid: torch.Tensor | None = None
                ) -> torch.Tensor:
        if grid is not None and (grid.dim() != 2 or bool((grid[:, 1:] != 1).any())):
            raise ValueError("any-resolution LLaVA rows take a (tiles, 1, 1) grid: the batch was "
                             "encoded for another model")
        size = int(self.config.vision_config.image_size)
        if pixel_values.dim() == 2:  # rows stored flat (encoded-dataset storage)
            pixel_values = pixel_values.reshape(pixel_values.shape[0], 3, size, size)
        return super().forward(pixel_values, None)


def _rows_per_item(grid: torch.Tensor) -> list[int]:
    return [int(t) for t in grid[:, 0].tolist()]


def _per_row(feats: torch.Tensor, rows: list[int], what: str) -> torch.Tensor:
    """[rows * T, h] -> [rows, T, h] (every tile / frame has the same token count T)."""
    n = sum(rows)
    if n == 0 or feats.shape[0] % n:
        raise ValueError(f"{feats.shape[0]} feature rows do not divide over the {n} {what} of "
                         "the grid: re-encode the sample with the model's processor")
    return feats.reshape(n, feats.shape[0] // n, feats.shape[-1])


def _tower_module(tower: nn.Module) -> AnyresTower:
    """The AnyresTower behind ``tower`` (a SplitTower holds it by reference)."""
    return getattr(tower, "_tower", tower)


def pack_images(module: AnyresTower, feats: torch.Tensor, grid: torch.Tensor,
                image_sizes: torch.Tensor, style: str) -> torch.Tensor:
    """Per-tile features [tiles * T, h] -> packed image features [image tokens, h], by
    transformers' ``pack_image_features`` of LLaVA-NeXT (``style="next"``) or OneVision."""
    rows = _rows_per_item(grid)
    if len(rows) != len(image_sizes):
        raise ValueError(f"image_grid_thw has {len(rows)} images but image_sizes "
                         f"{len(image_sizes)}: re-encode the sample with the model's processor")
    per_tile = _per_row(feats, rows, "tiles")
    parts = list(torch.split(per_tile, rows, dim=0))
    if style == "next":
        from transformers.models.llava_next.modeling_llava_next import LlavaNextModel

        packed, _ = LlavaNextModel.pack_image_features(
            module, parts, image_sizes, vision_feature_select_strategy=module.select_strategy,
            image_newline=module.image_newline)
    else:
        from transformers.models.llava_onevision.modeling_llava_onevision import (
            LlavaOnevisionModel,
        )

        packed, _ = LlavaOnevisionModel.pack_image_features(
            module, parts, image_sizes, image_newline=module.image_newline,
            vision_aspect_ratio=module.config.vision_aspect_ratio)
    return torch.cat(packed, dim=0)


def pack_videos(module: AnyresTower, feats: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Per-frame features [frames * T, h] -> OneVision's video features: each frame's map pooled
    (transformers' ``apply_pooling``), a video's frames in a row, one newline after each video."""
    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

    rows = _rows_per_item(grid)
    per_frame = _per_row(feats, rows, "frames")
    pooled = LlavaOnevisionModel.apply_pooling(module, per_frame)
    out = []
    newline = module.image_newline[None].to(pooled.dtype)
    for video in torch.split(pooled, rows, dim=0):
        out += [video.reshape(-1, video.shape[-1]), newline]
    return torch.cat(out, dim=0)


def _merge(style: str, tower: nn.Module, emb: torch.Tensor, input_ids: torch.Tensor,
           media: Mapping[str, torch.Tensor], kinds: Sequence[MediaKind],
           hf_config: PretrainedConfig) -> torch.Tensor:
    module = _tower_module(tower)
    feats = media_features(tower, media, kinds)  # per row; divided over ranks by a SplitTower
    if "image" in feats:
        if media.get("image_sizes") is None or media.get("image_grid_thw") is None:
            raise ValueError("any-resolution LLaVA images need image_sizes and image_grid_thw "
                             "next to pixel_values: re-encode with the model's template")
        feats["image"] = pack_images(module, feats["image"], media["image_grid_thw"],
                                     media["image_sizes"], style)
    if "video" in feats:
        feats["video"] = pack_videos(module, feats["video"], media["video_grid_thw"])
    token_ids = {k.name: int(getattr(hf_config, k.token_attr)) for k in kinds}
    return scatter_features(emb, input_ids, feats, kinds, token_ids)


def next_merge(tower, emb, input_ids, media, hf_config) -> torch.Tensor:
    """LLaVA-NeXT's ``VisionSpec.merge``: per-tile features packed per image, scattered."""
    return _merge("next", tower, emb, input_ids, media, (ANYRES_IMAGE,), hf_config)


def onevision_merge(tower, emb, input_ids, media, hf_config) -> torch.Tensor:
    """LLaVA-OneVision's ``VisionSpec.merge``: images (anyres-max) then videos (pooled)."""
    return _merge("onevision", tower, emb, input_ids, media, (ANYRES_IMAGE, FRAMES_VIDEO),
                  hf_config)


def hf_pixel_values(rows: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Our rows -> HF's padded ``[items, max_rows, 3, H, W]`` (zeros past each item's rows)."""
    counts = _rows_per_item(grid)
    out = rows.new_zeros((len(counts), max(counts), *rows.shape[1:]))
    for i, part in enumerate(torch.split(rows, counts)):
        out[i, : part.shape[0]] = part
    return out


def next_hf_inputs(hf_config: PretrainedConfig, batch: Mapping) -> dict:
    """LLaVA-NeXT's transformers forward inputs for a batch: padded tiles and image sizes."""
    return _hf_inputs(batch, multi_image_counts=False)


def onevision_hf_inputs(hf_config: PretrainedConfig, batch: Mapping) -> dict:
    """OneVision's: also the images-per-row counts (consecutive one-tile images form one
    multi-image row) and the videos as ``[videos, frames, 3, H, W]``."""
    return _hf_inputs(batch, multi_image_counts=True)


def _hf_inputs(batch: Mapping, multi_image_counts: bool) -> dict:
    kwargs = {"input_ids": batch["input_ids"]}
    if batch.get("pixel_values") is not None:
        grid = batch["image_grid_thw"]
        kwargs["pixel_values"] = hf_pixel_values(batch["pixel_values"], grid)
        kwargs["image_sizes"] = batch["image_sizes"]
        if multi_image_counts:
            counts: list[int] = []
            prev_multi = False
            for t in _rows_per_item(grid):
                multi = t == 1
                if multi and prev_multi:
                    counts[-1] += 1
                else:
                    counts.append(1)
                prev_multi = multi
            kwargs["batch_num_images"] = torch.tensor(counts)
    if batch.get("pixel_values_videos") is not None:
        kwargs["pixel_values_videos"] = hf_pixel_values(batch["pixel_values_videos"],
                                                        batch["video_grid_thw"])
    return kwargs


def next_from_processor(hf_config: PretrainedConfig, enc: Mapping) -> dict:
    """LLaVA-NeXT's ``VisionSpec.from_processor``."""
    return _from_processor(hf_config, enc, multi_image_base_only=False)


def onevision_from_processor(hf_config: PretrainedConfig, enc: Mapping) -> dict:
    """OneVision's ``VisionSpec.from_processor`` (multi-image rows: one tile per image)."""
    return _from_processor(hf_config, enc, multi_image_base_only=True)


def _from_processor(hf_config: PretrainedConfig, enc: Mapping,
                    multi_image_base_only: bool) -> dict:
    """HF processor output -> rows + ``image_grid_thw`` (+ videos as frame rows)."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    out: dict = {}
    pv = enc.get("pixel_values")
    if pv is not None:
        sizes = enc["image_sizes"]
        counts = [int(n) for n in enc.get("batch_num_images", [1] * len(sizes))]
        multi = [n > 1 and multi_image_base_only for n in counts for _ in range(n)]
        pinpoints = [list(p) for p in hf_config.image_grid_pinpoints]
        tiles = [1 if m else image_size_to_num_patches(s.tolist(), pinpoints, pv.shape[-1])
                 for s, m in zip(sizes, multi)]
        out["pixel_values"] = torch.cat([pv[i, :t] for i, t in enumerate(tiles)])
        out["image_grid_thw"] = torch.tensor([[t, 1, 1] for t in tiles], dtype=torch.long)
    vv = enc.get("pixel_values_videos")
    if vv is not None:
        out["pixel_values_videos"] = vv.reshape(-1, *vv.shape[2:])
        out["video_grid_thw"] = torch.tensor([[vv.shape[1], 1, 1]] * vv.shape[0],
                                             dtype=torch.long)
    return out
