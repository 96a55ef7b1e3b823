"""LLaVA-OneVision (transformers' ``LlavaOnevisionForConditionalGeneration``): a SigLIP ViT, the
2-layer MLP projector and a Qwen2 LLM. Images are any-resolution as in LLaVA-NeXT, with the
unpadded grid shrunk to at most ``anyres_max_N`` base tiles; each image of a multi-image row is
its base tile alone; videos are frames through the same ViT, pooled 2 x 2, with one newline per
video (:mod:`mvlm.models.llava.anyres`). Text positions are plain 1-D RoPE.
Files: ``weights.py`` (NeXT's table), ``template.py``, ``tiny.py``.
"""
from __future__ import annotations

from mvlm.models.llava import MODULE_TREE_PREFIXES, llava_text_arch
from mvlm.models.llava.anyres_kinds import ANYRES_IMAGE, FRAMES_VIDEO
from mvlm.models.registry import FamilySpec, VisionSpec, register


def _vision(cfg, dtype, device):
    from transformers.models.llava_onevision.modeling_llava_onevision import (
        LlavaOnevisionMultiModalProjector,
    )

    from mvlm.models.llava.anyres import AnyresTower

    return AnyresTower.build_with(LlavaOnevisionMultiModalProjector, cfg, dtype, device)


def _merge(*args):
    from mvlm.models.llava.anyres import onevision_merge

    return onevision_merge(*args)


def _hf_inputs(hf_config, batch):
    from mvlm.models.llava.anyres import onevision_hf_inputs

    return onevision_hf_inputs(hf_config, batch)


def _from_processor(hf_config, enc):
    from mvlm.models.llava.anyres import onevision_from_processor

    return onevision_from_processor(hf_config, enc)


LLAVA_ONEVISION = register(FamilySpec(
    name="llava_onevision",
    model_types=("llava_onevision",),
    hf_model_class="LlavaOnevisionForConditionalGeneration",
    text_arch=llava_text_arch,
    weights="mvlm.models.llava_onevision.weights:mappings",
    template="mvlm.models.llava_onevision.template:LlavaOnevisionTemplate",
    tiny="mvlm.models.llava_onevision.tiny:TINY",
    vision=VisionSpec(build=_vision, media=(ANYRES_IMAGE, FRAMES_VIDEO),
                      aligner_prefixes=("vision_model.multi_modal_projector.",
                                        "vision_model.image_newline"),
                      merge=_merge, from_processor=_from_processor,
                      peft_tower_prefixes=("model.vision_tower.",
                                           "model.multi_modal_projector.")),
    hf_forward_inputs=_hf_inputs,
    module_tree_prefixes=MODULE_TREE_PREFIXES + (("model.image_newline", "image_newline"),),
))
