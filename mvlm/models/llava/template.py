"""LLaVA chat template and image-token expansion, equal to ``LlavaProcessor``'s output.

The chat format is the checkpoint's LLM's (ChatML here; a Llama-3 LLaVA's checkpoint template is
taken by the jinja backend); an image is one ``<image>`` token in the rendered text, repeated
after tokenization to the ViT's token count: ``(H/patch) * (W/patch)`` patches plus the
processor's ``num_additional_image_tokens`` (CLS), minus one for the ``"default"`` feature
strategy. Every image is resized and cropped to the same size, so the count is known from the
processor alone and datasets can be encoded without decoding pixels. Positions are plain.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mvlm.data.errors import BadSampleError
from mvlm.data.formats import Sample
from mvlm.data.media import MediaConfig, load_image, probe_image
from mvlm.data.template import Template, TemplateConfig, _Prepared


def processed_size(image_processor: Any) -> tuple[int, int]:
    """(height, width) every image has after the processor: the crop, or a fixed resize."""
    if getattr(image_processor, "do_center_crop", False):
        crop = image_processor.crop_size
        return int(crop["height"]), int(crop["width"])
    size = image_processor.size or {}
    if "height" in size and "width" in size:
        return int(size["height"]), int(size["width"])
    raise ValueError(f"LLaVA image processor size {size} without a center crop gives images of "
                     "varying size: set do_center_crop or a fixed height/width in "
                     "preprocessor_config.json")


class LlavaTemplate(Template):
    """LLaVA: images as a run of ``<image>`` tokens (one per ViT feature), plain positions."""

    family = "llava"
    is_multimodal = True
    image_placeholder = "<image>"

    def __init__(self, tokenizer: Any, processor: Any = None, model_config: Any = None,
                 cfg: TemplateConfig | None = None, media: MediaConfig | None = None):
        if processor is None or getattr(processor, "image_processor", None) is None:
            raise ValueError(f"{self.family} needs the checkpoint's processor "
                             "(processor_config.json / preprocessor_config.json in the model dir)")
        super().__init__(tokenizer, processor, model_config, cfg, media)
        self.image_processor = processor.image_processor
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_placeholder)
        if model_config is not None and model_config.image_token_id != self.image_token_id:
            raise ValueError(f"config.json image_token_id={model_config.image_token_id} but the "
                             f"tokenizer's {self.image_placeholder} is {self.image_token_id}")
        self.image_size = processed_size(self.image_processor)
        strategy = getattr(processor, "vision_feature_select_strategy", None) or \
            getattr(model_config, "vision_feature_select_strategy", "default")
        patch = int(getattr(processor, "patch_size", None)
                    or model_config.vision_config.patch_size)
        h, w = self.image_size
        self.tokens_per_image = (h // patch) * (w // patch) \
            + int(getattr(processor, "num_additional_image_tokens", 0) or 0) \
            - (1 if strategy == "default" else 0)

    def prepare(self, sample: Sample, base_dir: str | None,
                with_pixels: bool = True) -> _Prepared:
        if sample.videos:
            raise BadSampleError("unsupported_media", f"{self.family} takes images, not videos")
        p = super().prepare(sample, base_dir, with_pixels)
        root = self.media.root_image_dir
        if with_pixels:
            p.images = [load_image(r, base_dir, root) for r in sample.images]
        else:  # probing validates the file; pixels come in load_pixels
            p.image_refs = [probe_image(r, base_dir, root).ref() for r in sample.images]
        return p

    def _pixels(self, images: list[Any]) -> torch.Tensor:
        try:
            pv = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        except (ValueError, OSError, RuntimeError) as e:
            raise BadSampleError("corrupt_media", f"image processor failed: {e}") from e
        if tuple(pv.shape[-2:]) != self.image_size:
            raise RuntimeError(f"image processor gave {tuple(pv.shape[-2:])} images, expected "
                               f"{self.image_size}: the token count would be wrong")
        return pv

    def process_vision(self, prepared: list[_Prepared]) -> list[dict]:
        out: list[dict] = [{} for _ in prepared]
        for j, p in enumerate(prepared):
            if p.image_refs:
                out[j]["image_refs"] = list(p.image_refs)
        imgs = [im for p in prepared for im in p.images]
        if imgs:
            pv = self._pixels(imgs)
            k = 0
            for j, p in enumerate(prepared):
                if p.images:
                    out[j]["pixel_values"] = pv[k:k + len(p.images)]
                    k += len(p.images)
        return out

    def load_pixels(self, sample: dict[str, Any]) -> dict[str, Any]:
        refs = sample.pop("image_refs", None)
        if refs:
            sample["pixel_values"] = self._pixels([load_image(r) for r in refs])
        return sample

    @staticmethod
    def _n_images(vision: dict) -> int:
        if "pixel_values" in vision:
            return len(vision["pixel_values"])
        return len(vision.get("image_refs", ()))

    def expand_vision(self, ids, train, vision):
        """Repeat each ``<image>`` to the image's token count (labels stay -100 there)."""
        is_img = ids == self.image_token_id
        n = self._n_images(vision)
        if int(is_img.sum()) != n:
            raise BadSampleError("media_count_mismatch",
                                 f"{int(is_img.sum())} image placeholders after rendering, but "
                                 f"{n} images (is a literal {self.image_placeholder} in text?)")
        if not n:
            return ids, train, vision
        reps = np.where(is_img, self.tokens_per_image, 1)
        return np.repeat(ids, reps), np.repeat(train & ~is_img, reps), vision

    def vision_blocks(self, ids, vision):
        """(start, end, "image", index) of each run of image tokens."""
        pads = np.flatnonzero(ids == self.image_token_id)
        c = self.tokens_per_image
        return [(int(pads[k * c]), int(pads[k * c]) + c, "image", k)
                for k in range(len(pads) // c)]

    def drop_vision(self, vision, keep, blocks):
        vision = dict(vision)
        n = self._n_images(vision)
        idx = [k for k in range(n) if ("image", k) in keep]
        if len(idx) == n:
            return vision
        if "image_refs" in vision:
            vision["image_refs"] = [vision["image_refs"][k] for k in idx]
        if "pixel_values" in vision:
            vision["pixel_values"] = vision["pixel_values"][idx]
        if not idx:
            vision.pop("image_refs", None)
            vision.pop("pixel_values", None)
        return vision
