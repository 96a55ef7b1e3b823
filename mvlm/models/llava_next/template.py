"""LLaVA-NeXT's template: any-resolution images (:mod:`mvlm.models.llava.anyres_template`)."""
from __future__ import annotations

from mvlm.models.llava.anyres_template import AnyresTemplate


class LlavaNextTemplate(AnyresTemplate):
    """Every image tiled (base + best pinpoint grid); images only."""

    family = "llava_next"
