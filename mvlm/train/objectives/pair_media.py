"""The vision tower once per preference pair: chosen and rejected share the prompt's images.

A pair is two segments of one packed row (:func:`mvlm.data.preference.collate_pairs`), and each
segment has its own image placeholders, so the batch lists the pair's media twice (the model
fills placeholders with feature rows in order). Running the tower on both copies doubles the
ViT's work for nothing. Here the first pipeline stage runs it on each pair's media once: the
duplicate copies are dropped from the micro-batch's media, and the features the tower returns
(``VLMModel.vision_features``; under TP x CP still divided over the ranks) are repeated into the
order the placeholders expect -- pair 0's rows for its chosen segment, the same rows for its
rejected segment, then pair 1's, ... -- before they are scattered into the embeddings. The
repetition is an index select, so the backward sums both segments' gradients into the one set of
features, which is what the duplicated run computes too.

The collator records, per media key, each pair's pixel rows and items (``pair_media``); a family
with its own merge function (``VisionSpec.merge``) keeps the duplicated media.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from mvlm.train.steps import model_forward, unwrap


def _ranges(starts: list[int], sizes: list[int], device: Any) -> torch.Tensor:
    parts = [torch.arange(a, a + n, device=device) for a, n in zip(starts, sizes)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)


def _offsets(sizes: list[int]) -> list[int]:
    out, acc = [], 0
    for n in sizes:
        out.append(acc)
        acc += n
    return out


def dedup_media(batch: dict, kinds: Any) -> tuple[dict, dict[str, Callable]]:
    """(the batch with each pair's media once, {kind name: features -> repeated features})."""
    info: Mapping[str, Any] = batch["pair_media"]
    out = dict(batch)
    expand: dict[str, Callable] = {}
    for kind in kinds:
        fk = kind.features_key
        if fk not in info or batch.get(fk) is None:
            continue
        rows, items = info[fk]["rows"], info[fk]["items"]
        px = batch[fk]
        # the duplicated layout: pair p's rows twice in a row; keep the first copy
        dup_rows = _offsets([2 * n for n in rows])
        out[fk] = px.index_select(0, _ranges(dup_rows, rows, px.device))
        grid = None
        dup_items = _offsets([2 * n for n in items])
        item_keys = ([kind.grid_key] if kind.grid_key else []) + list(kind.extra_keys)
        for k in item_keys:
            if batch.get(k) is not None:
                t = batch[k]
                out[k] = t.index_select(0, _ranges(dup_items, items, t.device))
        if kind.grid_key and out.get(kind.grid_key) is not None:
            grid = out[kind.grid_key]

        def rep(feats: torch.Tensor, items=items, grid=grid, name=kind.name) -> torch.Tensor:
            n_items = sum(items)
            if grid is not None:
                per = grid.prod(-1).to(torch.long).cpu()
                total = max(1, int(per.sum()))
                per_out = per * feats.shape[0] // total
            else:
                per_out = torch.full((n_items,), feats.shape[0] // max(1, n_items),
                                     dtype=torch.long)
            if int(per_out.sum()) != feats.shape[0]:
                raise ValueError(f"{name} features: {feats.shape[0]} rows do not divide "
                                 "over the pairs' items; the pair media cannot be shared")
            item_rows = per_out.tolist()
            item_start = _offsets(item_rows)
            pair_item0 = _offsets(items)
            starts, sizes = [], []
            for i0, k in zip(pair_item0, items):
                a = item_start[i0] if k else 0
                n = sum(item_rows[i0:i0 + k])
                starts += [a, a]
                sizes += [n, n]
            return feats.index_select(0, _ranges(starts, sizes, feats.device))

        expand[kind.name] = rep
    return out, expand


def pair_forward(model: Any, batch: dict,
                 forward: Callable[[Any, dict], torch.Tensor] = model_forward) -> torch.Tensor:
    """``forward(model, batch)`` with the tower run once per pair on the first stage (see the
    module docstring); unchanged elsewhere or where the media cannot be shared."""
    m = unwrap(model)
    vision = getattr(m.family, "vision", None)
    if (batch.get("pair_media") is None or not m.pre_process or m.vision_model is None
            or vision is None or vision.merge is not None):
        return forward(model, batch)
    unique, expand = dedup_media(batch, vision.media)
    if not expand:
        return forward(model, batch)
    features = m.vision_features

    def shared(media: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        f = features(media)
        return {k: (expand[k](v) if k in expand else v) for k, v in f.items()}

    m.vision_features = shared  # this forward only (an instance attribute over the method)
    try:
        return forward(model, unique)
    finally:
        del m.vision_features
