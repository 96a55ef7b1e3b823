"""Qwen2.5-VL chat template: Qwen2-VL's, with video temporal positions scaled by
``second_per_grid_ts * tokens_per_second`` (read off the checkpoint's vision config)."""
from __future__ import annotations

from mvlm.models.qwen2_vl.template import Qwen2VLTemplate


class Qwen2_5VLTemplate(Qwen2VLTemplate):
    """Qwen2.5-VL: as Qwen2-VL, plus video temporal positions scaled by second_per_grid_ts."""

    family = "qwen2_5_vl"
    uses_second_per_grid = True
