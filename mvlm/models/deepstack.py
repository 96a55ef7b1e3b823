"""DeepStack (Qwen3-VL): vision features of chosen ViT layers added to the hidden states of the
first decoder layers, at the image/video placeholder positions.

Why it is shaped this way:

* The tower (kept whole, HF module) returns its merged features and the K DeepStack levels
  concatenated along the feature dim, ``[n_tokens, hidden * (1 + K)]``: one tensor per media
  item, so the TP x CP image split (:mod:`mvlm.models.vision_parallel`) gathers them unchanged.
* Each level becomes a full-sequence ``[s, b, h]`` tensor that is zero off the placeholders
  (the per-kind scatter of :func:`mvlm.models.vision.scatter_features` on zeros, which is HF's
  joint image/video order); it is then cut exactly like the decoder input (CP chunks, then the
  sequence-parallel scatter), so every TP/SP/CP rank adds the rows it holds. ``x + 0 == x``, so
  the add is HF's masked add bit for bit.
* Level ``i`` is added to the output of global decoder layer ``i`` by a forward hook on that
  layer. Only the stage that embeds (the first pipeline stage) has the tower, so a layout that
  puts one of those layers on a later stage is refused at build time, as is full recompute
  (which would re-run the hooked layers after the micro-batch's levels are gone).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from mvlm.models.registry import MediaKind
from mvlm.models.vision import scatter_features

if TYPE_CHECKING:
    from torch import nn


def split_levels(features: Mapping[str, torch.Tensor], hidden: int, levels: int
                 ) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """``{kind: [n, h * (1 + K)]}`` -> (merged features per kind, K dicts of level features)."""
    main: dict[str, torch.Tensor] = {}
    per_level: list[dict[str, torch.Tensor]] = [{} for _ in range(levels)]
    for kind, f in features.items():
        if f.shape[-1] != hidden * (1 + levels):
            raise ValueError(f"the {kind} tower output has {f.shape[-1]} features per token; "
                             f"DeepStack with {levels} levels needs {hidden} x {1 + levels}")
        parts = f.split(hidden, dim=-1)
        main[kind] = parts[0]
        for i in range(levels):
            per_level[i][kind] = parts[1 + i]
    return main, per_level


def level_embeddings(emb: torch.Tensor, input_ids: torch.Tensor,
                     per_level: Sequence[Mapping[str, torch.Tensor]],
                     kinds: Sequence[MediaKind], token_ids: Mapping[str, int]
                     ) -> list[torch.Tensor]:
    """Full-sequence ``[s, b, h]`` addends, one per level: the level's features at the
    placeholder positions, zero elsewhere."""
    zeros = torch.zeros_like(emb)
    return [scatter_features(zeros, input_ids, lv, kinds, token_ids) for lv in per_level]


def check_layout(levels: int, layers: nn.ModuleList, pre_process: bool,
                 recompute_granularity: str | None) -> None:
    """Refuse layouts DeepStack cannot run in, naming the flag that changes it."""
    owned = [int(layer.layer_number) - 1 for layer in layers]
    late = [i for i in owned if i < levels]
    if late and not pre_process:
        raise ValueError(
            f"DeepStack adds vision features to decoder layers 0..{levels - 1}, but layer(s) "
            f"{late} sit on a later pipeline stage than the vision tower (mvlm splits layers "
            "evenly): lower --pipeline_model_parallel_size (--pp) so the first stage holds "
            f"at least {levels} layers")
    if levels and recompute_granularity == "full":
        raise ValueError("--recompute_granularity full re-runs the DeepStack layers after their "
                         "vision addends are released: use --recompute_granularity selective")


def install_hooks(layers: nn.ModuleList, levels: int,
                  current: Callable[[], list[torch.Tensor] | None]) -> None:
    """Forward hooks adding level ``i`` (``current()[i]``, this rank's rows) to the output of
    global decoder layer ``i``; no-ops while ``current()`` is None (text-only batches)."""

    def hook(module: nn.Module, args, output):
        addends = current()
        if addends is None:
            return output
        hidden, context = output
        return hidden + addends[int(module.layer_number) - 1].to(hidden.dtype), context

    for layer in layers:
        if int(layer.layer_number) - 1 < levels:
            layer.register_forward_hook(hook)
