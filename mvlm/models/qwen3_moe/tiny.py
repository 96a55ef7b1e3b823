"""The tiny Qwen3-MoE its tests build: 8 experts (6 in the indivisible variant) so EP=2/4 split
them, top-2 routing with renormalisation, a small aux loss, untied embeddings."""
from __future__ import annotations

from typing import Any

import transformers

from mvlm.testing.tiny_models import TinySpec, check_vocab, text_fields


def config(variant: str, ids: dict[str, int], overrides: dict[str, Any]
           ) -> transformers.PretrainedConfig:
    text = text_fields(variant, ids, moe=True)
    text.update(
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        tie_word_embeddings=False,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        router_aux_loss_coef=0.001,
    )
    overrides.pop("vision_config", None)
    text.update(overrides)
    # Qwen3 has an explicit head_dim (default 128 in HF): derive it from the final sizes.
    text.setdefault("head_dim", text["hidden_size"] // text["num_attention_heads"])
    check_vocab(text, ids)
    return transformers.Qwen3MoeConfig(**text)


TINY = TinySpec(config=config)
