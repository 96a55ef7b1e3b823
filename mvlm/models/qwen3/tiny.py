"""The tiny Qwen3 its tests build: q/k-norm, explicit head_dim, embeddings tied to the LM head
(like Qwen3-0.6B/1.7B/4B; ``tie_word_embeddings=False`` gives the 8B+ layout)."""
from __future__ import annotations

from typing import Any

import transformers

from mvlm.testing.tiny_models import TinySpec, check_vocab, text_fields


def config(variant: str, ids: dict[str, int], overrides: dict[str, Any]
           ) -> transformers.PretrainedConfig:
    text = text_fields(variant, ids)
    text.update(rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
                tie_word_embeddings=True, use_sliding_window=False, attention_bias=False)
    overrides.pop("vision_config", None)
    text.update(overrides)
    # Qwen3 has an explicit head_dim (default 128 in HF): derive it from the final sizes.
    text.setdefault("head_dim", text["hidden_size"] // text["num_attention_heads"])
    check_vocab(text, ids)
    return transformers.Qwen3Config(**text)


# ChatML with no default system prompt (Qwen3's own template adds none), written for this project.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

TINY = TinySpec(config=config, chat_template=CHAT_TEMPLATE)
