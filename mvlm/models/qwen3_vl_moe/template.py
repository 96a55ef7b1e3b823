"""Qwen3-VL-MoE's template is Qwen3-VL's (same processor, same tokens)."""
from __future__ import annotations

from mvlm.models.qwen3_vl.template import Qwen3VLTemplate


class Qwen3VLMoeTemplate(Qwen3VLTemplate):
    family = "qwen3_vl_moe"
