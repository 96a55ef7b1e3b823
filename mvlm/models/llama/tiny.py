"""The tiny Llama its tests build: Llama 3 special tokens and chat template, untied embeddings
(Llama 3.1 8B; ``tie_word_embeddings=True`` gives the 3.2 1B/3B layout), and Llama 3.1's
``llama3`` RoPE scaling with an original context short enough (256) that the scaled, smoothed
and unscaled frequency bands all occur in a 16-channel head."""
from __future__ import annotations

from typing import Any

import transformers

from mvlm.testing.tiny_models import TinySpec, check_vocab, text_fields

SPECIALS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

# Llama 3's format (as in Meta's template, without the date header), written for this project.
CHAT_TEMPLATE = (
    "{{- '<|begin_of_text|>' -}}"
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' -}}"
    "{{- message['content'] | trim + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
    "{%- endif -%}"
)


def config(variant: str, ids: dict[str, int], overrides: dict[str, Any]
           ) -> transformers.PretrainedConfig:
    text = text_fields(variant, ids)
    text.update(
        bos_token_id=ids["<|begin_of_text|>"],
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 256},
    )
    overrides.pop("vision_config", None)
    text.update(overrides)
    text.setdefault("head_dim", text["hidden_size"] // text["num_attention_heads"])
    check_vocab(text, ids)
    return transformers.LlamaConfig(**text)


TINY = TinySpec(config=config, special_tokens=SPECIALS, chat_template=CHAT_TEMPLATE,
                eos_token="<|eot_id|>")
