"""model_type -> Family: everything mvlm knows about one HF model family, in one object.

A family is one file (``qwen2.py``, ``qwen2_vl.py``, ...) that builds a ``Family`` and registers
it here. The registry is the only place that dispatches on ``model_type``, so an unsupported
checkpoint fails in one spot with the list of what is supported.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PretrainedConfig

    from mvlm.convert.mapping import Mapping
    from mvlm.models.gpt import TextArch


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    # transformers class name used to load the HF model for verification / generation
    hf_model_class: str
    text_arch: Callable[[PretrainedConfig], TextArch]
    mappings: Callable[[PretrainedConfig, TextArch], list[Mapping]]
    is_vlm: bool = False
    # builds the vision tower + aligner (a torch module whose forward(pixel_values, grid_thw)
    # returns the merged image embeddings [n_tokens, hidden]); None for text-only families
    build_vision: Callable[[PretrainedConfig, torch.dtype, str], nn.Module] | None = None
    token_ids: Callable[[PretrainedConfig], dict[str, int]] = field(
        default=lambda cfg: {})
    # Parameter-name prefixes (of VLMModel) that make up the aligner/projector; the rest of
    # ``vision_model.`` is the ViT, ``language_model.`` is the LLM. Used by --freeze_* and
    # --vit_lr/--aligner_lr.
    aligner_prefixes: tuple[str, ...] = ()


_REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    for mt in family.model_types:
        _REGISTRY[mt] = family
    return family


def _load_builtin() -> None:
    # Importing a family module registers it.
    from mvlm.models import qwen2, qwen2_5_vl, qwen2_vl, qwen3_moe  # noqa: F401


def supported_model_types() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def get_family(model_type: str) -> Family:
    _load_builtin()
    try:
        return _REGISTRY[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported by mvlm. Supported model types: "
            f"{', '.join(supported_model_types())}. Check config.json's \"model_type\", or add a "
            "family file under mvlm/models/ and register it."
        ) from None
