"""LLaVA-OneVision weights: the same table as LLaVA-NeXT (LLM under ``language_model.``, SigLIP
tower and projector whole, ``image_newline``)."""
from __future__ import annotations

from mvlm.models.llava_next.weights import mappings

__all__ = ["mappings"]
