"""LLaVA-OneVision's template: any-resolution images (only a row's single image is tiled; each
image of a multi-image row is its base tile + a newline) and videos
(:mod:`mvlm.models.llava.anyres_template`)."""
from __future__ import annotations

from mvlm.models.llava.anyres_template import AnyresTemplate


class LlavaOnevisionTemplate(AnyresTemplate):
    """anyres-max images, base-tile multi-image rows, pooled videos."""

    family = "llava_onevision"
    multi_image_base_only = True
    takes_video = True
