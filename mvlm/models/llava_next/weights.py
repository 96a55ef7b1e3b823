"""LLaVA-NeXT weights: LLaVA's table (LLM under ``language_model.``, tower and projector whole)
plus the newline embedding ``image_newline`` (hub layout; ``model.image_newline`` in
transformers 5's module tree), replicated like the tower."""
from __future__ import annotations

from transformers import PretrainedConfig

from mvlm.convert.mapping import Mapping, Replicated
from mvlm.models.gpt import TextArch
from mvlm.models.llava import weights as llava_weights


def mappings(hf_config: PretrainedConfig, arch: TextArch) -> list[Mapping]:
    return llava_weights.mappings(hf_config, arch) + [
        Replicated("vision_model.image_newline", "image_newline")]
