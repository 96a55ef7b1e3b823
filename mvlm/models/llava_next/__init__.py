"""LLaVA-NeXT (transformers' ``LlavaNextForConditionalGeneration``): LLaVA's ViT + 2-layer MLP
projector + LLM, with any-resolution images -- a base tile plus the tiles of the best
``image_grid_pinpoints`` resolution, unpadded and closed by an ``image_newline`` per row
(:mod:`mvlm.models.llava.anyres`, shared with OneVision). Text positions are plain 1-D RoPE.
Files: ``weights.py`` (LLaVA's table + ``image_newline``), ``template.py``, ``tiny.py``.
"""
from __future__ import annotations

from mvlm.models.llava.anyres_family import register_anyres_family
from mvlm.models.llava.anyres_kinds import ANYRES_IMAGE

LLAVA_NEXT = register_anyres_family(
    name="llava_next",
    hf_model_class="LlavaNextForConditionalGeneration",
    projector="transformers.models.llava_next.modeling_llava_next:LlavaNextMultiModalProjector",
    flavour="next",
    media=(ANYRES_IMAGE,),
    template="LlavaNextTemplate",
)
