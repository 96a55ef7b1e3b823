"""The tiny Qwen2 its tests build: like the small Qwen2 models (0.5B/1.5B), embeddings tied to
the LM head, no sliding window; sizes from ``mvlm.testing.tiny_models`` per variant."""
from __future__ import annotations

from typing import Any

import transformers

from mvlm.testing.tiny_models import TinySpec, check_vocab, text_fields


def config(variant: str, ids: dict[str, int], overrides: dict[str, Any]
           ) -> transformers.PretrainedConfig:
    text = text_fields(variant, ids)
    text.update(rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
                tie_word_embeddings=True, use_sliding_window=False)
    overrides.pop("vision_config", None)
    text.update(overrides)
    check_vocab(text, ids)
    return transformers.Qwen2Config(**text)


TINY = TinySpec(config=config)
