"""The tiny Qwen2.5-VL its tests build: the Qwen2-VL tiny config with Qwen2.5-VL's vision fields
(width ``hidden_size``, output ``out_hidden_size``, window attention with full attention in
``fullatt_block_indexes``, ``tokens_per_second`` for video time)."""
from __future__ import annotations

from typing import Any

import transformers

from mvlm.models.qwen2_vl.tiny import VISION_SPECIALS, vl_config, vl_processor
from mvlm.testing.tiny_models import TinySpec


def _vision_fields(v: dict[str, Any], text: dict[str, Any]) -> dict[str, Any]:
    return {
        "depth": v["depth"],
        "hidden_size": v["width"],
        "num_heads": v["num_heads"],
        "intermediate_size": v["intermediate"],
        "out_hidden_size": text["hidden_size"],
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "in_channels": 3,
        # 56 px = 2 merged units per window side: small images still split into windows.
        "window_size": 56,
        "fullatt_block_indexes": list(v["fullatt"]),
        "tokens_per_second": 2,
    }


def config(variant: str, ids: dict[str, int], overrides: dict[str, Any]
           ) -> transformers.PretrainedConfig:
    return vl_config(transformers.Qwen2_5_VLConfig, _vision_fields, variant, ids, overrides)


def processor(tokenizer: Any, config: transformers.PretrainedConfig) -> Any:
    return vl_processor(transformers.Qwen2_5_VLProcessor, tokenizer, config)


TINY = TinySpec(config=config, special_tokens=VISION_SPECIALS,
                auto_class="AutoModelForImageTextToText", processor=processor)
