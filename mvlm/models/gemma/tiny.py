"""The tiny Gemma its tests build: head_dim 16 (Gemma's own default is 256), GeGLU, zero-centred
norms, scaled and tied embeddings, ``<start_of_turn>`` template (system prompt in the first user
turn, as Gemma 3's template writes it)."""
from __future__ import annotations

from typing import Any

import transformers

from mvlm.testing.tiny_models import TinySpec, check_vocab, text_fields

SPECIALS = ("<bos>", "<start_of_turn>", "<end_of_turn>")

CHAT_TEMPLATE = (
    "{{- '<bos>' -}}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first = messages[0]['content'] + '\\n\\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for m in loop_messages -%}"
    "{%- set role = 'model' if m['role'] == 'assistant' else m['role'] -%}"
    "{{- '<start_of_turn>' + role + '\\n' + (first if loop.first else '') + m['content']"
    " + '<end_of_turn>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
)


def config(variant: str, ids: dict[str, int], overrides: dict[str, Any]
           ) -> transformers.PretrainedConfig:
    text = text_fields(variant, ids)
    text.update(bos_token_id=ids["<bos>"], tie_word_embeddings=True,
                hidden_act="gelu_pytorch_tanh",
                rope_parameters={"rope_type": "default", "rope_theta": 10_000.0})
    overrides.pop("vision_config", None)
    text.update(overrides)
    text.setdefault("head_dim", text["hidden_size"] // text["num_attention_heads"])
    check_vocab(text, ids)
    return transformers.GemmaConfig(**text)


TINY = TinySpec(config=config, special_tokens=SPECIALS, chat_template=CHAT_TEMPLATE,
                eos_token="<end_of_turn>")
