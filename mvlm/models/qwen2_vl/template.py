"""Qwen2-VL chat template and vision-token expansion, equal to the HF processor's output.

Images/videos render as ``<|vision_start|><|image_pad|><|vision_end|>`` (one pad, as HF chat
templates write it); after tokenization each pad is repeated ``prod(grid_thw) / merge**2`` times.
Pixels come from the checkpoint's own image/video processor, called once per batch of rows; the
grids are predicted from the image size alone (``smart_resize``) so datasets can be encoded
without decoding pixels. Positions are Qwen's 3-D mRoPE (``mvlm.data.mrope``). Truncation never
cuts a vision block (``vision_blocks`` / ``drop_vision``).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mvlm.data.errors import BadSampleError
from mvlm.data.formats import Sample
from mvlm.data.media import (
    DALI_HINT,
    MediaConfig,
    dali_available,
    dali_decode_resize,
    load_image,
    load_video,
    probe_image,
    read_media_bytes,
    smart_resize,
)
from mvlm.data.mrope import get_rope_index
from mvlm.data.template import Template, TemplateConfig, _Prepared, raw_image_size


class Qwen2VLTemplate(Template):
    """Qwen2-VL: images/videos as <|vision_start|><|image_pad|>*N<|vision_end|>, 3-D mRoPE."""

    family = "qwen2_vl"
    is_multimodal = True
    uses_second_per_grid = False

    def __init__(self, tokenizer: Any, processor: Any = None, model_config: Any = None,
                 cfg: TemplateConfig | None = None, media: MediaConfig | None = None):
        if processor is None or getattr(processor, "image_processor", None) is None:
            raise ValueError(f"{self.family} needs the checkpoint's processor "
                             "(processor_config.json / preprocessor_config.json in the model dir)")
        super().__init__(tokenizer, processor, model_config, cfg, media)
        ip = processor.image_processor
        self.image_processor = ip
        self.video_processor = getattr(processor, "video_processor", None)
        self.merge = int(ip.merge_size)
        self.patch = int(ip.patch_size)
        self.temporal_patch = int(ip.temporal_patch_size)
        self.image_token_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.video_token_id = tokenizer.convert_tokens_to_ids("<|video_pad|>")
        self.vision_start_id = tokenizer.convert_tokens_to_ids("<|vision_start|>")
        self.vision_end_id = tokenizer.convert_tokens_to_ids("<|vision_end|>")
        vc = getattr(model_config, "vision_config", None)
        self.tokens_per_second = getattr(vc, "tokens_per_second", None) \
            if self.uses_second_per_grid else None
        if self.uses_second_per_grid and self.tokens_per_second is None:
            self.tokens_per_second = 2
        self.factor = self.patch * self.merge
        size = ip.size
        lo, hi = self.media.image_pixel_range(
            self.factor, int(size.get("shortest_edge") or 56 * 56),
            int(size.get("longest_edge") or 28 * 28 * 1280))
        self.pixel_range = (lo, hi)
        self.dali_device: int | None = None
        if self.media.image_backend == "dali":
            if not dali_available():
                raise ImportError(DALI_HINT)
            if torch.cuda.is_available():
                self.dali_device = torch.cuda.current_device()
        self.image_kwargs = {}
        if (lo, hi) != (size.get("shortest_edge"), size.get("longest_edge")):
            self.image_kwargs["size"] = {"shortest_edge": lo, "longest_edge": hi}
        self.video_kwargs: dict[str, Any] = {"do_sample_frames": False}
        if self.video_processor is not None:
            vs = self.video_processor.size
            vlo, vhi = self.media.video_pixel_range(
                self.factor, int(vs.get("shortest_edge") or 128 * 28 * 28),
                int(vs.get("longest_edge") or 768 * 28 * 28))
            if (vlo, vhi) != (vs.get("shortest_edge"), vs.get("longest_edge")):
                self.video_kwargs["size"] = {"shortest_edge": vlo, "longest_edge": vhi}

    def image_grid(self, height: int, width: int) -> tuple[int, int, int]:
        """(t, h, w) patch grid of an image -- the processor's smart resize, without pixels."""
        h, w = smart_resize(height, width, self.factor, *self.pixel_range)
        return (1, h // self.patch, w // self.patch)

    def prepare(self, sample: Sample, base_dir: str | None,
                with_pixels: bool = True) -> _Prepared:
        p = super().prepare(sample, base_dir, with_pixels)
        root = self.media.root_image_dir
        if with_pixels:
            p.images = [load_image(r, base_dir, root) for r in sample.images]
            sizes = [(im.height, im.width) for im in p.images]
        else:
            infos = [probe_image(r, base_dir, root) for r in sample.images]
            p.image_refs = [i.ref() for i in infos]
            sizes = [(i.height, i.width) for i in infos]
        p.image_grids = [self.image_grid(h, w) for h, w in sizes]  # validates the geometry
        p.videos = [load_video(r, self.media, base_dir) for r in sample.videos]
        return p

    def process_vision(self, prepared: list[_Prepared]) -> list[dict]:
        out: list[dict] = [{} for _ in prepared]
        for j, p in enumerate(prepared):
            if p.image_refs:  # pixels later (load_pixels); the grid is known from the size
                out[j]["image_grid_thw"] = torch.tensor(p.image_grids, dtype=torch.long)
                out[j]["image_refs"] = list(p.image_refs)
        imgs = [im for p in prepared for im in p.images]
        if imgs:
            try:
                r = self.image_processor(images=imgs, return_tensors="pt", **self.image_kwargs)
            except (ValueError, OSError, RuntimeError) as e:
                raise BadSampleError("corrupt_media", f"image processor failed: {e}") from e
            expect = [g for p in prepared for g in p.image_grids]
            if r["image_grid_thw"].tolist() != [list(g) for g in expect]:
                raise RuntimeError(f"image processor grids {r['image_grid_thw'].tolist()} differ "
                                   f"from the predicted {expect}: smart_resize out of sync")
            sizes = (r["image_grid_thw"].prod(-1)).tolist()
            pv = torch.split(r["pixel_values"], sizes)
            k = 0
            for j, p in enumerate(prepared):
                if p.images:
                    m = len(p.images)
                    out[j]["pixel_values"] = torch.cat(pv[k:k + m])
                    out[j]["image_grid_thw"] = r["image_grid_thw"][k:k + m]
                    k += m
        vids = [(j, v) for j, p in enumerate(prepared) for v in p.videos]
        if vids:
            if self.video_processor is None:
                raise BadSampleError("unsupported_media", "the checkpoint has no video processor")
            try:
                r = self.video_processor(videos=[torch.from_numpy(v.frames) for _, v in vids],
                                         return_tensors="pt", **self.video_kwargs)
            except (ValueError, OSError, RuntimeError) as e:
                raise BadSampleError("corrupt_media", f"video processor failed: {e}") from e
            sizes = r["video_grid_thw"].prod(-1).tolist()
            pv = torch.split(r["pixel_values_videos"], sizes)
            for j in range(len(prepared)):
                sel = [k for k, (jj, _) in enumerate(vids) if jj == j]
                if sel:
                    out[j]["pixel_values_videos"] = torch.cat([pv[k] for k in sel])
                    out[j]["video_grid_thw"] = r["video_grid_thw"][sel]
                    out[j]["second_per_grid_ts"] = torch.tensor(
                        [self.temporal_patch / vids[k][1].sample_fps for k in sel],
                        dtype=torch.float32)
        return out

    def load_pixels(self, sample: dict[str, Any]) -> dict[str, Any]:
        """Decode ``image_refs`` and run the image processor (in loader workers)."""
        refs = sample.pop("image_refs", None)
        if not refs:
            return sample
        kwargs = dict(self.image_kwargs)
        if self.media.image_backend == "dali":
            imgs = self._dali_images(refs, torch.as_tensor(sample["image_grid_thw"]))
            kwargs["do_resize"] = False  # DALI already resized to the grid's pixel size
        else:
            imgs = [load_image(r) for r in refs]
        try:
            r = self.image_processor(images=imgs, return_tensors="pt", **kwargs)
        except (ValueError, OSError, RuntimeError) as e:
            raise BadSampleError("corrupt_media", f"image processor failed: {e}") from e
        if not torch.equal(r["image_grid_thw"], torch.as_tensor(sample["image_grid_thw"])):
            raise BadSampleError("media_changed", "an image's size differs from when the "
                                 "dataset was encoded; re-run mvlm encode")
        sample["pixel_values"] = r["pixel_values"]
        return sample

    def _dali_images(self, refs: list[Any], grid: torch.Tensor) -> list[Any]:
        """Decode + resize with DALI; images with an EXIF rotation go through PIL instead."""
        out: list[Any] = [None] * len(refs)
        enc, sizes, where = [], [], []
        for k, ref in enumerate(refs):
            src = read_media_bytes(ref)
            if isinstance(src, str):
                with open(src, "rb") as f:
                    src = f.read()
            data = src
            size = (int(grid[k, 1]) * self.patch, int(grid[k, 2]) * self.patch)
            info = probe_image(data)
            if (info.height, info.width) != raw_image_size(data):  # rotated by EXIF: PIL path
                img = load_image(data).resize(size[::-1], resample=3)
                out[k] = np.asarray(img)
                continue
            enc.append(data)
            sizes.append(size)
            where.append(k)
        if enc:
            for k, arr in zip(where, dali_decode_resize(enc, sizes, self.dali_device)):
                out[k] = arr
        return [torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1) for a in out]

    def _counts(self, grid: torch.Tensor | None) -> list[int]:
        if grid is None:
            return []
        return (grid.prod(-1) // (self.merge ** 2)).tolist()

    def expand_vision(self, ids, train, vision):
        """Repeat each single pad id to the grid's token count (labels stay -100 there)."""
        img_counts = self._counts(vision.get("image_grid_thw"))
        vid_counts = self._counts(vision.get("video_grid_thw"))
        is_img = ids == self.image_token_id
        is_vid = ids == self.video_token_id
        if int(is_img.sum()) != len(img_counts) or int(is_vid.sum()) != len(vid_counts):
            raise BadSampleError("media_count_mismatch",
                                 f"{int(is_img.sum())} image / {int(is_vid.sum())} video "
                                 f"placeholders after rendering, but {len(img_counts)} images / "
                                 f"{len(vid_counts)} videos (is a literal <|image_pad|> in text?)")
        if not img_counts and not vid_counts:
            return ids, train, vision
        reps = np.ones(len(ids), dtype=np.int64)
        reps[np.flatnonzero(is_img)] = img_counts
        reps[np.flatnonzero(is_vid)] = vid_counts
        ids = np.repeat(ids, reps)
        train = np.repeat(train & ~is_img & ~is_vid, reps)
        return ids, train, vision

    def vision_blocks(self, ids, vision):
        """(start, end, kind, index) of each image/video block incl. its start/end markers."""
        blocks = []
        n = len(ids)
        for kind, tok, key in (("image", self.image_token_id, "image_grid_thw"),
                               ("video", self.video_token_id, "video_grid_thw")):
            pads = np.flatnonzero(ids == tok)
            off = 0
            for k, c in enumerate(self._counts(vision.get(key))):
                s, e = int(pads[off]), int(pads[off + c - 1]) + 1
                off += c
                if s > 0 and ids[s - 1] == self.vision_start_id:
                    s -= 1
                if e < n and ids[e] == self.vision_end_id:
                    e += 1
                blocks.append((s, e, kind, k))
        return sorted(blocks)

    def drop_vision(self, vision, keep, blocks):
        vision = dict(vision)
        for kind, pv_key, grid_key in (("image", "pixel_values", "image_grid_thw"),
                                       ("video", "pixel_values_videos", "video_grid_thw")):
            grid = vision.get(grid_key)
            if grid is None:
                continue
            idx = [k for k in range(len(grid)) if (kind, k) in keep]
            if len(idx) == len(grid):
                continue
            if kind == "image" and "image_refs" in vision:
                vision["image_refs"] = [vision["image_refs"][k] for k in idx]
            if pv_key in vision:
                chunks = torch.split(vision[pv_key], grid.prod(-1).tolist())
            if idx:
                if pv_key in vision:
                    vision[pv_key] = torch.cat([chunks[k] for k in idx])
                vision[grid_key] = grid[idx]
                if kind == "video" and "second_per_grid_ts" in vision:
                    vision["second_per_grid_ts"] = vision["second_per_grid_ts"][idx]
            else:
                vision.pop(pv_key, None)
                vision.pop(grid_key)
                if kind == "image":
                    vision.pop("image_refs", None)
                if kind == "video":
                    vision.pop("second_per_grid_ts", None)
        return vision

    def position_ids(self, ids, vision):
        return get_rope_index(
            ids, image_token_id=self.image_token_id, video_token_id=self.video_token_id,
            spatial_merge_size=self.merge, image_grid_thw=vision.get("image_grid_thw"),
            video_grid_thw=vision.get("video_grid_thw"),
            second_per_grid_ts=vision.get("second_per_grid_ts"),
            tokens_per_second=self.tokens_per_second)
