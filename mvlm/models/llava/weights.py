"""LLaVA weights, hub layout (what transformers 5 ``save_pretrained`` writes, and the original
LLaVA-HF layout of the LLM): the LLM's own family table (Llama, Qwen2, ...) under
``language_model.`` (``language_model.model.layers.*``, ``language_model.lm_head.weight``), then
the vision tower under ``vision_tower.*`` and the projector under ``multi_modal_projector.*``,
both kept whole (HF modules, replicated per TP rank).

Older hub checkpoints nest the CLIP tower one level deeper (``vision_tower.vision_model.*``);
transformers reads them, this table names the layout transformers 5 writes."""
from __future__ import annotations

import copy

from transformers import PretrainedConfig

from mvlm.convert.mapping import Mapping, Replicated
from mvlm.models.gpt import TextArch
from mvlm.models.registry import get_family

LLM_PREFIX = "language_model."


def _under(prefix: str, m: Mapping) -> Mapping:
    """The same mapping with every HF name under ``prefix``."""
    out = copy.copy(m)
    out.hf = tuple(prefix + h for h in m.hf)
    return out


def mappings(hf_config: PretrainedConfig, arch: TextArch) -> list[Mapping]:
    tc = hf_config.text_config
    llm = get_family(tc.model_type).mappings(tc, arch)
    return [_under(LLM_PREFIX, m) for m in llm] + [
        Replicated("vision_model.vision_tower.{*}", "vision_tower.{*}"),
        Replicated("vision_model.multi_modal_projector.{*}", "multi_modal_projector.{*}"),
    ]
