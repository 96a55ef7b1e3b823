"""InternVL weights, hub layout (what transformers 5 ``save_pretrained`` writes for the ``-hf``
checkpoints; the same as LLaVA's): the LLM's own family table (Qwen2, Qwen3, Llama, ...) under
``language_model.``, the InternViT under ``vision_tower.*`` and the pixel-shuffle projector under
``multi_modal_projector.*`` (``layer_norm``, ``linear_1``, ``linear_2``), both kept whole (HF
modules, replicated per TP rank)."""
from __future__ import annotations

from transformers import PretrainedConfig

from mvlm.convert.mapping import Mapping, Replicated
from mvlm.models.gpt import TextArch
from mvlm.models.llava.weights import LLM_PREFIX, _under
from mvlm.models.registry import get_family


def mappings(hf_config: PretrainedConfig, arch: TextArch) -> list[Mapping]:
    tc = hf_config.text_config
    llm = get_family(tc.model_type).mappings(tc, arch)
    return [_under(LLM_PREFIX, m) for m in llm] + [
        Replicated("vision_model.vision_tower.{*}", "vision_tower.{*}"),
        Replicated("vision_model.multi_modal_projector.{*}", "multi_modal_projector.{*}"),
    ]
