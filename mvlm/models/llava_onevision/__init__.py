"""LLaVA-OneVision (transformers' ``LlavaOnevisionForConditionalGeneration``): a SigLIP ViT, the
2-layer MLP projector and a Qwen2 LLM. Images are any-resolution as in LLaVA-NeXT, with the
unpadded grid shrunk to at most ``anyres_max_N`` base tiles; each image of a multi-image row is
its base tile alone; videos are frames through the same ViT, pooled 2 x 2, with one newline per
video (:mod:`mvlm.models.llava.anyres`). Text positions are plain 1-D RoPE.
Files: ``weights.py`` (NeXT's table), ``template.py``, ``tiny.py``.
"""
from __future__ import annotations

from mvlm.models.llava.anyres_family import register_anyres_family
from mvlm.models.llava.anyres_kinds import ANYRES_IMAGE, FRAMES_VIDEO

LLAVA_ONEVISION = register_anyres_family(
    name="llava_onevision",
    hf_model_class="LlavaOnevisionForConditionalGeneration",
    projector="transformers.models.llava_onevision.modeling_llava_onevision:LlavaOnevisionMultiModalProjector",
    flavour="onevision",
    media=(ANYRES_IMAGE, FRAMES_VIDEO),
    template="LlavaOnevisionTemplate",
)
