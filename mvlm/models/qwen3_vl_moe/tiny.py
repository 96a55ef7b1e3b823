"""The tiny Qwen3-VL-MoE its tests build: the tiny Qwen3-VL (4 layers, 2-block ViT feeding
DeepStack on decoder layers 0-1) with 8 experts of 32 per layer, top-2, so EP2 holds 4 each.
Saved in the hub's layout: ``save_pretrained`` writes the fused experts as the module holds them
([E, 2 * inter, hidden]); the hub checkpoints, which transformers transposes on load, and mvlm's
export store [E, hidden, 2 * inter] (``weights.py``)."""
from __future__ import annotations

import pathlib
from typing import Any

import transformers

from mvlm.models.qwen2_vl.tiny import VISION_SPECIALS
from mvlm.models.qwen3_vl.tiny import processor, vl_config
from mvlm.testing.tiny_models import TinySpec


def config(variant: str, ids: dict[str, int], overrides: dict[str, Any]
           ) -> transformers.PretrainedConfig:
    overrides.setdefault("num_experts_per_tok", 2)
    overrides.setdefault("router_aux_loss_coef", 0.001)
    return vl_config(transformers.Qwen3VLMoeConfig, variant, ids, overrides, moe=True)


def to_hub_layout(ckpt: pathlib.Path) -> None:
    """Transpose every fused expert tensor of a single-file tiny checkpoint to the hub layout."""
    from safetensors.torch import load_file, save_file

    path = ckpt / "model.safetensors"
    tensors = load_file(path)
    for name, t in tensors.items():
        if name.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")):
            tensors[name] = t.transpose(1, 2).contiguous()
    save_file(tensors, path, metadata={"format": "pt"})


TINY = TinySpec(config=config, special_tokens=VISION_SPECIALS,
                auto_class="AutoModelForImageTextToText", processor=processor,
                to_hub_layout=to_hub_layout)
