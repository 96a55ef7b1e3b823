"""LLaVA (transformers' ``LlavaForConditionalGeneration``): a CLIP-style ViT, a 2-layer MLP
projector and any LLM mvlm has a family for (Llama for LLaVA-1.5, Qwen2 for LLaVA-Interleave).

Unlike Qwen-VL, images have a fixed resolution: the processor resizes and crops each image to the
ViT's ``image_size`` and the prompt's single ``<image>`` becomes one token per patch (plus the CLS
token when ``vision_feature_select_strategy`` is ``"full"``). The tower's input is a batch of
whole images ``pixel_values [n_images, 3, H, W]`` with no grid; the features are the hidden states
of ``vision_feature_layer`` (one layer, or several concatenated), projected and scattered into the
``<image>`` tokens. Positions are plain 1-D RoPE (three equal rows).
Files: ``weights.py`` (the LLM's decoder table + tower and projector kept whole),
``template.py``, ``tiny.py``.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from mvlm.models.registry import FamilySpec, MediaKind, VisionSpec, get_family, register

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PretrainedConfig

    from mvlm.models.gpt import TextArch

# One kind of media: whole images; the batch key is HF's processor output name.
IMAGE = MediaKind("image", token_attr="image_token_id", features_key="pixel_values")
# The projector (aligner) in the tower module; the rest of ``vision_model.`` is the ViT.
ALIGNER_PREFIXES = ("vision_model.multi_modal_projector.",)
# transformers 5's module tree nests the LLM's decoder, the ViT and the projector under
# ``model.``; the hub layout (what save_pretrained writes, what the weight table names) is the
# original LLaVA one, with the whole LLM under ``language_model.``. Last: hub checkpoints saved
# before transformers 5 (llava-hf/llava-1.5-*) nest the CLIP tower one level deeper,
# ``vision_tower.vision_model.*``; the reader serves them under ``vision_tower.*`` too (last, so
# PEFT paths still map ``vision_tower.`` to the module tree's ``model.vision_tower.``).
MODULE_TREE_PREFIXES = (("model.language_model.", "language_model.model."),
                        ("lm_head.", "language_model.lm_head."),
                        ("model.vision_tower.", "vision_tower."),
                        ("model.multi_modal_projector.", "multi_modal_projector."),
                        ("vision_tower.vision_model.", "vision_tower."))
PEFT_TOWER_PREFIXES = ("model.vision_tower.", "model.multi_modal_projector.")


def llava_text_arch(cfg: PretrainedConfig) -> TextArch:
    """The LLM's architecture, from the family registered for ``text_config.model_type``."""
    tc = cfg.text_config
    text_family = get_family(tc.model_type)
    if text_family.is_vlm:
        raise ValueError(f"LLaVA text_config.model_type {tc.model_type!r} is a vision-language "
                         "family: the LLM of a LLaVA checkpoint must be a text model")
    arch = text_family.text_arch(tc)
    arch.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False)
                                    or getattr(tc, "tie_word_embeddings", False))
    return arch


def hf_forward_inputs(hf_config: PretrainedConfig, batch: Mapping[str, Any]) -> dict[str, Any]:
    """LLaVA's HF forward takes the ids and the images; its positions are 0..S-1 (ours too)."""
    kwargs = {"input_ids": batch["input_ids"]}
    if "pixel_values" in batch:
        kwargs["pixel_values"] = batch["pixel_values"]
    return kwargs


def _vision(cfg: PretrainedConfig, dtype: torch.dtype, device: str) -> nn.Module:
    from mvlm.models.llava.tower import LlavaTower

    return LlavaTower.build(cfg, dtype, device)


LLAVA = register(FamilySpec(
    name="llava",
    model_types=("llava",),
    hf_model_class="LlavaForConditionalGeneration",
    text_arch=llava_text_arch,
    weights="mvlm.models.llava.weights:mappings",
    template="mvlm.models.llava.template:LlavaTemplate",
    tiny="mvlm.models.llava.tiny:TINY",
    vision=VisionSpec(build=_vision, media=(IMAGE,), aligner_prefixes=ALIGNER_PREFIXES,
                      peft_tower_prefixes=PEFT_TOWER_PREFIXES),
    hf_forward_inputs=hf_forward_inputs,
    module_tree_prefixes=MODULE_TREE_PREFIXES,
))
