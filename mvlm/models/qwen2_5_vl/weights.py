"""Qwen2.5-VL weights: the Qwen2-VL table read top to bottom -- the Qwen2 decoder
(``model.layers.*``, ``model.embed_tokens``, ``model.norm``, ``lm_head``) and the whole vision
tower with its merger under ``visual.*`` (window-attention blocks and RMSNorms included: the HF
module is kept, so its parameters map 1:1)."""
from __future__ import annotations

from mvlm.models.qwen2_vl.weights import mappings

__all__ = ["mappings"]
