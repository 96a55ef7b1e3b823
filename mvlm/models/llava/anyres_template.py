"""Template of any-resolution LLaVA (NeXT, OneVision), equal to the HF processor's output.

Each ``<image>`` becomes a run whose length depends on the image's size (base tile + unpadded
tile grid + one newline per grid row, OneVision: capped at ``anyres_max_N`` base tiles); the
count is the processor's own ``_get_number_of_features`` on the image's (height, width), so
datasets are encoded from image headers alone and pixels come later in the loader. OneVision
does not tile the images of a multi-image row (base tile + one newline each) and turns each
``<video>`` into ``frames * ceil(side/2)^2 + 1`` tokens (pooled frames, one newline).
Pixels are laid out as rows (:mod:`mvlm.models.llava.anyres`): HF's padded
``[images, max_tiles, 3, H, W]`` without the padding, plus ``image_grid_thw = (tiles, 1, 1)``.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from mvlm.data.errors import BadSampleError
from mvlm.data.formats import Sample
from mvlm.data.media import load_image, load_video, probe_image
from mvlm.data.template import _Prepared
from mvlm.models.llava.template import LlavaTemplate


class AnyresTemplate(LlavaTemplate):
    """Images as size-dependent runs of ``<image>``; subclasses set ``multi_image_base_only``
    (OneVision) and ``takes_video``."""

    family = "llava_anyres"  # each family's subclass names itself
    multi_image_base_only = False
    takes_video = False
    video_placeholder = "<video>"

    def __init__(self, tokenizer: Any, processor: Any = None, model_config: Any = None,
                 cfg: Any = None, media: Any = None):
        super().__init__(tokenizer, processor, model_config, cfg, media)
        self.processor = processor
        self.pinpoints = [list(p) for p in self.image_processor.image_grid_pinpoints]
        self.strategy = getattr(processor, "vision_feature_select_strategy", None) or \
            model_config.vision_feature_select_strategy
        self.video_processor = getattr(processor, "video_processor", None)
        if self.takes_video:
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_placeholder)

    # -- counts ---------------------------------------------------------------------------
    def _tiles(self, size: tuple[int, int], multi: bool) -> int:
        """Tiles the processor makes of an image of ``size`` (base tile included)."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        if multi and self.multi_image_base_only:
            return 1
        return image_size_to_num_patches(list(size), self.pinpoints, self.image_size[0])

    def _image_tokens(self, size: tuple[int, int], multi: bool) -> int:
        h, w = self.image_size
        if multi and self.multi_image_base_only:
            n = self.processor.num_image_tokens + 1  # base tile + one newline
        else:
            n = self.processor._get_number_of_features(int(size[0]), int(size[1]), h, w)
        return n - (1 if self.strategy == "default" else 0)

    def _video_tokens(self, frames: int) -> int:
        side = math.ceil(math.sqrt(self.processor.num_image_tokens) / 2)
        return frames * side * side + 1

    # -- media ----------------------------------------------------------------------------
    def prepare(self, sample: Sample, base_dir: str | None,
                with_pixels: bool = True) -> _Prepared:
        if sample.videos and not self.takes_video:
            raise BadSampleError("unsupported_media", f"{self.family} takes images, not videos")
        videos = sample.videos
        p = super(LlavaTemplate, self).prepare(sample, base_dir, with_pixels)
        root = self.media.root_image_dir
        if with_pixels:
            p.images = [load_image(r, base_dir, root) for r in sample.images]
            p.image_hw = [(im.height, im.width) for im in p.images]
        else:
            infos = [probe_image(r, base_dir, root) for r in sample.images]
            p.image_refs = [i.ref() for i in infos]
            p.image_hw = [(i.height, i.width) for i in infos]
        p.videos = [load_video(r, self.media, base_dir) for r in videos]
        return p

    def _pixels_of(self, images: list[Any]) -> dict[str, torch.Tensor]:
        """One row's images -> rows, image_sizes, image_grid_thw (the processor called on the
        row alone, as it sees one prompt's images)."""
        arg = [images] if self.multi_image_base_only else images
        try:
            r = self.image_processor(images=arg, return_tensors="pt")
        except (ValueError, OSError, RuntimeError) as e:
            raise BadSampleError("corrupt_media", f"image processor failed: {e}") from e
        pv, sizes = r["pixel_values"], r["image_sizes"]
        multi = len(images) > 1
        tiles = [self._tiles(tuple(s.tolist()), multi) for s in sizes]
        if tuple(pv.shape[-2:]) != self.image_size or max(tiles) > pv.shape[1]:
            raise RuntimeError(f"image processor gave {tuple(pv.shape)}, expected tiles of "
                               f"{self.image_size} and up to {max(tiles)} per image")
        rows = torch.cat([pv[i, :t] for i, t in enumerate(tiles)])
        grid = torch.tensor([[t, 1, 1] for t in tiles], dtype=torch.long)
        return {"pixel_values": rows, "image_sizes": sizes.to(torch.long),
                "image_grid_thw": grid}

    def process_vision(self, prepared: list[_Prepared]) -> list[dict]:
        out: list[dict] = [{} for _ in prepared]
        for j, p in enumerate(prepared):
            hw = getattr(p, "image_hw", [])
            multi = len(hw) > 1
            if hw:
                out[j]["_image_tokens"] = [self._image_tokens(s, multi) for s in hw]
            if p.image_refs:
                out[j]["image_refs"] = list(p.image_refs)
            if p.images:
                out[j].update(self._pixels_of(p.images))
            if p.videos:
                out[j].update(self._video_pixels(p.videos))
        return out

    def _video_pixels(self, videos: list[Any]) -> dict[str, Any]:
        if self.video_processor is None:
            raise BadSampleError("unsupported_media", "the checkpoint has no video processor")
        try:
            r = self.video_processor(videos=[torch.from_numpy(v.frames) for v in videos],
                                     return_tensors="pt", do_sample_frames=False)
        except (ValueError, OSError, RuntimeError) as e:
            raise BadSampleError("corrupt_media", f"video processor failed: {e}") from e
        pv = r["pixel_values_videos"]  # [videos, frames, 3, H, W]: one row's videos
        frames = [int(v.frames.shape[0]) for v in videos]
        if len(set(frames)) != 1 or pv.shape[1] != frames[0]:
            raise BadSampleError("unsupported_media", f"videos of one row have {frames} frames: "
                                 "the video processor stacks them, so they must be equal")
        return {"pixel_values_videos": pv.reshape(-1, *pv.shape[2:]),
                "video_grid_thw": torch.tensor([[f, 1, 1] for f in frames], dtype=torch.long),
                "_video_tokens": [self._video_tokens(f) for f in frames]}

    def load_pixels(self, sample: dict[str, Any]) -> dict[str, Any]:
        refs = sample.pop("image_refs", None)
        if refs:
            sample.update(self._pixels_of([load_image(r) for r in refs]))
        return sample

    # -- tokens ---------------------------------------------------------------------------
    def expand_vision(self, ids, train, vision):
        """Repeat each ``<image>`` / ``<video>`` to its item's token count (labels -100)."""
        reps = np.ones(len(ids), dtype=np.int64)
        is_media = np.zeros(len(ids), dtype=bool)
        kinds = [("image", self.image_token_id, "_image_tokens")]
        if self.takes_video:
            kinds.append(("video", self.video_token_id, "_video_tokens"))
        for name, tok, key in kinds:
            at = np.flatnonzero(ids == tok)
            counts = vision.get(key, [])
            if len(at) != len(counts):
                raise BadSampleError("media_count_mismatch",
                                     f"{len(at)} {name} placeholders after rendering, but "
                                     f"{len(counts)} {name}s (is a literal <{name}> in text?)")
            reps[at] = counts
            is_media[at] = True
        if not is_media.any():
            return ids, train, vision
        return np.repeat(ids, reps), np.repeat(train & ~is_media, reps), vision

    def vision_blocks(self, ids, vision):
        """(start, end, kind, index) of each image / video token run, in order."""
        blocks = []
        kinds = [("image", self.image_token_id, "_image_tokens")]
        if self.takes_video:
            kinds.append(("video", self.video_token_id, "_video_tokens"))
        for name, tok, key in kinds:
            pos = np.flatnonzero(ids == tok)
            k = 0
            for i, c in enumerate(vision.get(key, [])):
                blocks.append((int(pos[k]), int(pos[k]) + c, name, i))
                k += c
        return sorted(blocks)

    def drop_vision(self, vision, keep, blocks):
        vision = dict(vision)
        n_img = len(vision.get("_image_tokens", []))
        idx = [k for k in range(n_img) if ("image", k) in keep]
        if len(idx) != n_img:
            if self.multi_image_base_only and n_img > 1 and idx:
                raise BadSampleError("too_long", "truncation would keep part of a multi-image "
                                     f"{self.family} row, whose images are encoded together; "
                                     "raise --max_length")
            _select(vision, idx, "pixel_values", "image_grid_thw",
                    ("image_sizes", "image_refs", "_image_tokens"))
        n_vid = len(vision.get("_video_tokens", []))
        vidx = [k for k in range(n_vid) if ("video", k) in keep]
        if len(vidx) != n_vid:
            _select(vision, vidx, "pixel_values_videos", "video_grid_thw", ("_video_tokens",))
        return vision


def _select(vision: dict, idx: list[int], rows_key: str, grid_key: str,
            item_keys: tuple[str, ...]) -> None:
    """Keep items ``idx`` of one media kind (rows by the grid, per-item keys by index)."""
    if rows_key in vision:
        counts = vision[grid_key][:, 0].tolist()
        parts = torch.split(vision[rows_key], counts)
        vision[rows_key] = torch.cat([parts[k] for k in idx]) if idx else None
        vision[grid_key] = vision[grid_key][idx]
    for key in item_keys:
        if key in vision:
            v = vision[key]
            vision[key] = v[idx] if isinstance(v, torch.Tensor) else [v[k] for k in idx]
    if not idx:
        for key in (rows_key, grid_key, *item_keys):
            vision.pop(key, None)
