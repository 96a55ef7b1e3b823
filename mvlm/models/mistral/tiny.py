"""The tiny Mistral its tests build: no sliding window (as v0.2/v0.3), untied embeddings,
``<s>`` / ``</s>`` / ``[INST]`` / ``[/INST]`` special tokens and the v0.3 chat format."""
from __future__ import annotations

from typing import Any

import transformers

from mvlm.testing.tiny_models import TinySpec, check_vocab, text_fields

SPECIALS = ("<s>", "</s>", "[INST]", "[/INST]")

# Mistral v0.3's format (system prompt before the last user turn), written for this project.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- set ns = namespace(last=-1) -%}"
    "{%- for m in loop_messages -%}{%- if m['role'] == 'user' -%}"
    "{%- set ns.last = loop.index0 -%}{%- endif -%}{%- endfor -%}"
    "{{- '<s>' -}}"
    "{%- for m in loop_messages -%}"
    "{%- if m['role'] == 'user' -%}"
    "{%- if loop.index0 == ns.last and system is defined -%}"
    "{{- '[INST] ' + system + '\\n\\n' + m['content'] + '[/INST]' -}}"
    "{%- else -%}{{- '[INST] ' + m['content'] + '[/INST]' -}}{%- endif -%}"
    "{%- elif m['role'] == 'assistant' -%}{{- ' ' + m['content'] + '</s>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def config(variant: str, ids: dict[str, int], overrides: dict[str, Any]
           ) -> transformers.PretrainedConfig:
    text = text_fields(variant, ids)
    text.update(bos_token_id=ids["<s>"], rms_norm_eps=1e-5, tie_word_embeddings=False,
                sliding_window=None,
                rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0})
    overrides.pop("vision_config", None)
    text.update(overrides)
    text.setdefault("head_dim", text["hidden_size"] // text["num_attention_heads"])
    check_vocab(text, ids)
    return transformers.MistralConfig(**text)


TINY = TinySpec(config=config, special_tokens=SPECIALS, chat_template=CHAT_TEMPLATE,
                eos_token="</s>")
