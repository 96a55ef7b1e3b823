"""Vision towers kept in their HF implementation, wrapped to one calling convention.

The tower and its aligner (Qwen's patch merger) run on the first pipeline stage, replicated on
every TP and CP rank. Keeping HF's module makes the vision weights map 1:1 and its numerics
exact. Under TP/CP > 1 the micro-batch's images are divided over those ranks and the features
gathered back (:mod:`mvlm.models.vision_parallel`, on by default), so the ViT's FLOPs are not
repeated TP x CP times; :func:`media_features` picks the path.
"""
from __future__ import annotations

import contextlib
import importlib
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from transformers import PretrainedConfig

from mvlm.models.registry import MediaKind
from mvlm.models.vision_parallel import TrainableParam, VisionSplit, split_tower_outputs


def vision_attn_impl(device: str) -> str:
    if device == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


class HFVisionTower(nn.Module):
    """forward(pixel_values, grid_thw) -> merged embeddings [n_image_tokens, text_hidden]."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.tower = module

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        dtype = next(self.tower.parameters()).dtype
        out = self.tower(pixel_values.to(dtype), grid_thw=grid_thw)
        return out.pooler_output if hasattr(out, "pooler_output") else out


def tower_init(enabled: bool) -> contextlib.AbstractContextManager:
    """The context a tower is built in: as transformers initialises it, or -- when the weights
    are loaded right after (``perform_initialization=False``: conversion, checkpoint and HF
    loads) -- with transformers' and torch's init functions turned off. Random-initialising a
    tower only to overwrite it cost 0.26 s of a 4 s TP=1 conversion of the 1.4 GB bench model;
    buffers computed in ``__init__`` (rotary frequencies) are computed either way."""
    if enabled:
        return contextlib.nullcontext()
    from transformers.initialization import no_init_weights

    return no_init_weights()


def build_hf_vision(module_path: str, class_name: str, vision_config: PretrainedConfig,
                    dtype: torch.dtype, device: str) -> HFVisionTower:
    cls = getattr(importlib.import_module(module_path), class_name)
    vision_config._attn_implementation = vision_attn_impl(device)
    with torch.device("cpu" if device == "cpu" else device):
        module = cls._from_config(vision_config, dtype=dtype)
    return HFVisionTower(module)


def media_features(tower: nn.Module, media: Mapping[str, torch.Tensor],
                   kinds: Sequence[MediaKind], split: VisionSplit | None = None,
                   trainable: Sequence[TrainableParam] | None = None
                   ) -> dict[str, torch.Tensor]:
    """Tower features [rows, hidden] per media kind present in ``media`` (by kind name, in the
    family's order). With ``split`` the items of all kinds are divided over its ranks in one
    partition and gathered back (collective over ``split.group``: every rank of it must call
    this with the same media; ``trainable``: see ``split_tower_outputs``); without, the tower
    runs every item here."""
    present = [k for k in kinds if media.get(k.features_key) is not None]
    inputs = [(media[k.features_key], media.get(k.grid_key) if k.grid_key else None)
              for k in present]
    if split is not None and inputs:
        outs = split_tower_outputs(tower, inputs, split, trainable)
    else:
        outs = [tower(px, grid) for px, grid in inputs]
    return {k.name: out for k, out in zip(present, outs)}


def scatter_features(emb: torch.Tensor, input_ids: torch.Tensor,
                     features: Mapping[str, torch.Tensor], kinds: Sequence[MediaKind],
                     token_ids: Mapping[str, int]) -> torch.Tensor:
    """Embeddings [s, b, h] with each kind's features written, in order, into the positions of
    its placeholder token. The placeholder count must equal the number of feature rows, or the
    sample was expanded for another geometry."""
    for kind in kinds:
        feats = features.get(kind.name)
        if feats is None:
            continue
        feats = feats.to(emb.dtype)
        mask = (input_ids == token_ids[kind.name]).transpose(0, 1)  # [s, b]
        n = int(mask.sum())
        if n != feats.shape[0]:
            raise ValueError(
                f"{n} {kind.name} placeholder tokens but the vision tower produced "
                f"{feats.shape[0]} embeddings: the {kind.grid_key or kind.features_key} does not "
                "match the expanded prompt (re-encode the sample with the model's processor)")
        emb = emb.transpose(0, 1).masked_scatter(mask.transpose(0, 1)[..., None],
                                                 feats).transpose(0, 1)
    return emb


def merge_at_placeholders(tower: nn.Module, emb: torch.Tensor, input_ids: torch.Tensor,
                          media: Mapping[str, torch.Tensor], kinds: Sequence[MediaKind],
                          token_ids: Mapping[str, int],
                          split: VisionSplit | None = None) -> torch.Tensor:
    """Embeddings [s, b, h] with each media kind's tower features written, in order, into the
    positions of its placeholder token (the default ``VisionSpec.merge``).

    Kinds are merged in the family's order (images, then videos for Qwen-VL); a kind whose
    features key is absent from ``media`` is skipped. ``split``: see :func:`media_features`."""
    feats = media_features(tower, media, kinds, split)
    return scatter_features(emb, input_ids, feats, kinds, token_ids)
