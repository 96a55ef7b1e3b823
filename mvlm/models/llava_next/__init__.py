"""LLaVA-NeXT (transformers' ``LlavaNextForConditionalGeneration``): LLaVA's ViT + 2-layer MLP
projector + LLM, with any-resolution images -- a base tile plus the tiles of the best
``image_grid_pinpoints`` resolution, unpadded and closed by an ``image_newline`` per row
(:mod:`mvlm.models.llava.anyres`, shared with OneVision). Text positions are plain 1-D RoPE.
Files: ``weights.py`` (LLaVA's table + ``image_newline``), ``template.py``, ``tiny.py``.
"""
from __future__ import annotations

from mvlm.models.llava import MODULE_TREE_PREFIXES, llava_text_arch
from mvlm.models.llava.anyres_kinds import ANYRES_IMAGE
from mvlm.models.registry import FamilySpec, VisionSpec, register


def _vision(cfg, dtype, device):
    from transformers.models.llava_next.modeling_llava_next import LlavaNextMultiModalProjector

    from mvlm.models.llava.anyres import AnyresTower

    return AnyresTower.build_with(LlavaNextMultiModalProjector, cfg, dtype, device)


def _merge(*args):
    from mvlm.models.llava.anyres import next_merge

    return next_merge(*args)


def _hf_inputs(hf_config, batch):
    from mvlm.models.llava.anyres import next_hf_inputs

    return next_hf_inputs(hf_config, batch)


def _from_processor(hf_config, enc):
    from mvlm.models.llava.anyres import next_from_processor

    return next_from_processor(hf_config, enc)


LLAVA_NEXT = register(FamilySpec(
    name="llava_next",
    model_types=("llava_next",),
    hf_model_class="LlavaNextForConditionalGeneration",
    text_arch=llava_text_arch,
    weights="mvlm.models.llava_next.weights:mappings",
    template="mvlm.models.llava_next.template:LlavaNextTemplate",
    tiny="mvlm.models.llava_next.tiny:TINY",
    vision=VisionSpec(build=_vision, media=(ANYRES_IMAGE,),
                      aligner_prefixes=("vision_model.multi_modal_projector.",
                                        "vision_model.image_newline"),
                      merge=_merge, from_processor=_from_processor,
                      peft_tower_prefixes=("model.vision_tower.",
                                           "model.multi_modal_projector.")),
    hf_forward_inputs=_hf_inputs,
    module_tree_prefixes=MODULE_TREE_PREFIXES + (("model.image_newline", "image_newline"),),
))
