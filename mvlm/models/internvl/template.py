"""InternVL chat template and image-token expansion, equal to ``InternVLProcessor``'s output.

The chat format is the LLM's ChatML; an image is one ``<IMG_CONTEXT>`` plus a newline in the
rendered text (what InternVL's chat template writes for an image part), expanded after
tokenization to ``<img>`` + ``image_seq_length * tiles`` ``<IMG_CONTEXT>`` + ``</img>``. The tile
count (dynamic tiling + thumbnail) depends only on the image size, so datasets are encoded from
the image headers without decoding pixels (the image processor's own
``get_number_of_image_patches``); pixels ``[n_tiles, 3, H, W]`` follow image by image in prompt
order, as the processor returns them. Positions are plain.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mvlm.data.errors import BadSampleError
from mvlm.data.formats import Sample
from mvlm.data.media import MediaConfig, load_image, probe_image
from mvlm.data.template import Template, TemplateConfig, _Prepared


class InternVLTemplate(Template):
    """InternVL: an image is ``<img>``, its tiles' ``<IMG_CONTEXT>`` tokens, ``</img>``."""

    family = "internvl"
    is_multimodal = True
    image_placeholder = "<IMG_CONTEXT>\n"

    def __init__(self, tokenizer: Any, processor: Any = None, model_config: Any = None,
                 cfg: TemplateConfig | None = None, media: MediaConfig | None = None):
        if processor is None or getattr(processor, "image_processor", None) is None:
            raise ValueError(f"{self.family} needs the checkpoint's processor "
                             "(processor_config.json in the model dir)")
        super().__init__(tokenizer, processor, model_config, cfg, media)
        self.image_processor = processor.image_processor
        self.image_token_id = int(processor.image_token_id)
        self.start_id = int(processor.start_image_token_id)
        self.end_id = int(processor.end_image_token_id)
        if model_config is not None and model_config.image_token_id != self.image_token_id:
            raise ValueError(f"config.json image_token_id={model_config.image_token_id} but the "
                             f"tokenizer's {processor.image_token} is {self.image_token_id}")
        self.tokens_per_tile = int(processor.image_seq_length)

    # ------------------------------------------------------------------ media
    def prepare(self, sample: Sample, base_dir: str | None,
                with_pixels: bool = True) -> _Prepared:
        if sample.videos:
            raise BadSampleError("unsupported_media", f"{self.family} takes images, not videos "
                                 "(mvlm's InternVL template has no video path)")
        p = super().prepare(sample, base_dir, with_pixels)
        root = self.media.root_image_dir
        if with_pixels:
            p.images = [load_image(r, base_dir, root) for r in sample.images]
        else:  # probing validates the file and gives the size; pixels come in load_pixels
            infos = [probe_image(r, base_dir, root) for r in sample.images]
            p.image_refs = [i.ref() for i in infos]
            if infos:  # read by process_vision, dropped in finish
                p.extra["_tiles"] = [self.tiles(i.height, i.width) for i in infos]
        return p

    def tiles(self, height: int, width: int) -> int:
        """Tiles of an image of this size (the grid, plus the thumbnail when the grid has more
        than one tile), by the image processor's own rule."""
        return int(self.image_processor.get_number_of_image_patches(height, width, {}))

    def _pixels(self, images: list[Any]) -> tuple[torch.Tensor, list[int]]:
        try:
            out = self.image_processor(images=images, return_tensors="pt")
        except (ValueError, OSError, RuntimeError) as e:
            raise BadSampleError("corrupt_media", f"image processor failed: {e}") from e
        return out["pixel_values"], [int(n) for n in out["num_patches"]]

    def process_vision(self, prepared: list[_Prepared]) -> list[dict]:
        out: list[dict] = [{} for _ in prepared]
        for j, p in enumerate(prepared):
            if p.image_refs:
                out[j]["image_refs"] = list(p.image_refs)
                out[j]["_tiles"] = list(p.extra["_tiles"])
        imgs = [im for p in prepared for im in p.images]
        if imgs:
            pv, tiles = self._pixels(imgs)
            k = t = 0
            for j, p in enumerate(prepared):
                if p.images:
                    n = sum(tiles[k:k + len(p.images)])
                    out[j]["pixel_values"] = pv[t:t + n]
                    out[j]["_tiles"] = tiles[k:k + len(p.images)]
                    k += len(p.images)
                    t += n
        return out

    def load_pixels(self, sample: dict[str, Any]) -> dict[str, Any]:
        refs = sample.pop("image_refs", None)
        if refs:
            pv, tiles = self._pixels([load_image(r) for r in refs])
            n_tok = int((torch.as_tensor(sample["input_ids"]) == self.image_token_id).sum())
            if n_tok != self.tokens_per_tile * sum(tiles):
                raise BadSampleError("media_count_mismatch",
                                     f"{n_tok} <IMG_CONTEXT> tokens were encoded from the image "
                                     f"headers but the decoded images give {sum(tiles)} tiles "
                                     f"of {self.tokens_per_tile} (EXIF rotation after probing?)")
            sample["pixel_values"] = pv
        return sample

    def finish(self, p: _Prepared, ids, offsets, vision):
        p.extra.pop("_tiles", None)  # the tile counts travel in ``vision`` from here on
        return super().finish(p, ids, offsets, vision)

    # ------------------------------------------------------------------ tokens
    def expand_vision(self, ids, train, vision):
        """Each ``<IMG_CONTEXT>`` becomes ``<img>`` + its tiles' tokens + ``</img>`` (labels
        stay -100 there)."""
        is_img = ids == self.image_token_id
        tiles = vision.get("_tiles", [])
        if int(is_img.sum()) != len(tiles):
            raise BadSampleError("media_count_mismatch",
                                 f"{int(is_img.sum())} image placeholders after rendering, but "
                                 f"{len(tiles)} images (is a literal <IMG_CONTEXT> in text?)")
        if np.isin(ids, (self.start_id, self.end_id)).any():
            raise BadSampleError("media_count_mismatch", "the text holds a literal <img> or "
                                 "</img> token: it would be read as an image boundary")
        if not tiles:
            return ids, train, vision
        out_ids: list[np.ndarray] = []
        out_train: list[np.ndarray] = []
        pos = 0
        for k, at in enumerate(np.flatnonzero(is_img)):
            out_ids += [ids[pos:at], np.asarray([self.start_id], dtype=ids.dtype),
                        np.full(self.tokens_per_tile * tiles[k], self.image_token_id,
                                dtype=ids.dtype),
                        np.asarray([self.end_id], dtype=ids.dtype)]
            out_train += [train[pos:at],
                          np.zeros(self.tokens_per_tile * tiles[k] + 2, dtype=bool)]
            pos = at + 1
        out_ids.append(ids[pos:])
        out_train.append(train[pos:])
        return np.concatenate(out_ids), np.concatenate(out_train), vision

    def vision_blocks(self, ids, vision):
        """(start, end, "image", index) of each ``<img> ... </img>`` run."""
        starts = np.flatnonzero(ids == self.start_id)
        ends = np.flatnonzero(ids == self.end_id)
        return [(int(s), int(e) + 1, "image", k) for k, (s, e) in enumerate(zip(starts, ends))]

    def drop_vision(self, vision, keep, blocks):
        vision = dict(vision)
        tiles = list(vision.get("_tiles", []))
        idx = [k for k in range(len(tiles)) if ("image", k) in keep]
        if len(idx) == len(tiles):
            return vision
        if "image_refs" in vision:
            vision["image_refs"] = [vision["image_refs"][k] for k in idx]
        if "pixel_values" in vision:
            first = np.concatenate([[0], np.cumsum(tiles)])
            rows = [r for k in idx for r in range(int(first[k]), int(first[k + 1]))]
            vision["pixel_values"] = vision["pixel_values"][rows]
        vision["_tiles"] = [tiles[k] for k in idx]
        if not idx:
            vision.pop("image_refs", None)
            vision.pop("pixel_values", None)
        return vision
