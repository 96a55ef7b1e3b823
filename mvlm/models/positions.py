"""Position ids for any family: always 3 rows (mRoPE layout); the family says how to fill them.

Every family's decoder takes [3, B, S] position ids (``mvlm.models.gpt``): text-only families get
three equal rows (plain RoPE), multimodal families their own 3-D positions. Which one is a
family's choice (``FamilySpec.position_ids``); this module is the one entry point callers use.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from transformers import PretrainedConfig


def text_positions(hf_config: PretrainedConfig, input_ids: torch.Tensor,
                   media: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """[3, B, S] plain positions 0..S-1 on every row and axis (a text-only family's choice)."""
    b, s = input_ids.shape
    return torch.arange(s, dtype=torch.long).view(1, 1, s).expand(3, b, s).contiguous()


def batch_position_ids(hf_config: PretrainedConfig, input_ids: torch.Tensor,
                       media: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """[3, B, S] for an unpadded batch (each row one sample; media items consumed in row order).

    ``media`` holds the family's media batch keys (e.g. the grids of its images); None or empty
    for a text-only batch."""
    from mvlm.models.registry import get_family

    media = {k: v for k, v in (media or {}).items() if v is not None}
    return get_family(hf_config.model_type).position_ids(hf_config, input_ids, media)
