"""The vision tower once per preference pair: chosen and rejected share the prompt's images.

A pair is two segments of one packed row (:func:`mvlm.data.preference.collate_pairs`), and each
segment has its own image placeholders, so the batch lists the pair's media twice (the model
fills placeholders with feature rows in order). Running the tower on both copies doubles the
ViT's work for nothing. Here the first pipeline stage runs it on each pair's media once and
repeats the features into the order the placeholders expect -- pair 0's rows for its chosen
segment, the same rows for its rejected segment, then pair 1's, ... The repetition is an index
select, so the backward sums both segments' gradients into the one set of features, which is
what the duplicated run computes too. Under TP x CP the tower's (unique) items are still divided
over the ranks (:mod:`mvlm.models.vision_parallel`).

Two ways in, by family:

* default merge (Qwen-VL, InternVL, LLaVA, ...: features scattered into the placeholders): the
  duplicate copies are dropped from the micro-batch's media and ``VLMModel.vision_features`` is
  wrapped to repeat what the tower returns (:func:`dedup_media`);
* a family with its own ``VisionSpec.merge`` (LLaVA-NeXT / OneVision pack tiles per image,
  Qwen2.5-Omni adds audio): the merge keeps the duplicated media -- its per-image packing reads
  ``image_sizes`` / grids for every placeholder block -- and receives a tower callable
  (:class:`SharedTower`) that, called on a pair-duplicated media tensor, runs the real tower on
  the first copies only and returns the per-row features repeated, i.e. what the tower gives
  on the duplicated tensor (towers treat items independently: the contract the vision split
  relies on too). Media without pair bookkeeping (Omni's audio) go through unchanged.

The collator records, per media key, each pair's pixel rows and items (``pair_media``).
"""
from __future__ import annotations

import dataclasses
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


def first_copies(t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Rows of ``t`` laid out as pair p's ``sizes[p]`` rows twice in a row -> the first copies."""
    return t.index_select(0, _ranges(_offsets([2 * n for n in sizes]), sizes, t.device))


def repeater(items: list[int], grid: torch.Tensor | None, name: str
             ) -> Callable[[torch.Tensor], torch.Tensor]:
    """features of each pair's unique items (in pair order) -> each pair's features twice, the
    layout of the pair-duplicated media. ``grid``: the unique items' grid (rows per item are
    proportional to its product), or None (every item has the same number of feature rows)."""

    def rep(feats: torch.Tensor) -> torch.Tensor:
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
        starts, sizes = [], []
        for i0, k in zip(_offsets(items), items):
            a = item_start[i0] if k else 0
            n = sum(item_rows[i0:i0 + k])
            starts += [a, a]
            sizes += [n, n]
        return feats.index_select(0, _ranges(starts, sizes, feats.device))

    return rep


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
        out[fk] = first_copies(batch[fk], rows)
        item_keys = ([kind.grid_key] if kind.grid_key else []) + list(kind.extra_keys)
        for k in item_keys:
            if batch.get(k) is not None:
                out[k] = first_copies(batch[k], items)
        grid = out.get(kind.grid_key) if kind.grid_key else None
        expand[kind.name] = repeater(items, grid, kind.name)
    return out, expand


class SharedTower:
    """The tower callable handed to a family's own merge during a pair forward (module
    docstring): ``(pixels, grid) -> features`` like the tower, with the tower run once per pair
    on the pair-duplicated media tensors of ``batch`` (recognised by identity: the merge reads
    them from the batch's media) and unchanged on anything else. ``_tower`` is the module behind
    it, as for :class:`~mvlm.models.vision_parallel.SplitTower` (merges read the tower's
    parameters and config through it)."""

    def __init__(self, tower: Callable[..., torch.Tensor], batch: dict, kinds: Any) -> None:
        self.tower = tower
        self._tower = getattr(tower, "_tower", tower)
        info: Mapping[str, Any] = batch["pair_media"]
        # (duplicated pixels, duplicated grid or None, rows per pair, items per pair, name)
        self.entries = [(batch[k.features_key], batch.get(k.grid_key) if k.grid_key else None,
                         info[k.features_key]["rows"], info[k.features_key]["items"], k.name)
                        for k in kinds
                        if k.features_key in info and batch.get(k.features_key) is not None]
        self.rows_in = 0  # pixel rows the tower actually ran on (what the tests count)

    def __call__(self, pixel_values: torch.Tensor, grid: torch.Tensor | None = None
                 ) -> torch.Tensor:
        for px, dup_grid, rows, items, name in self.entries:
            if pixel_values is px and (grid is None) == (dup_grid is None):
                unique = first_copies(px, rows)
                ugrid = None if grid is None else first_copies(grid, items)
                self.rows_in += int(unique.shape[0])
                return repeater(items, ugrid, name)(self.tower(unique, ugrid))
        self.rows_in += int(pixel_values.shape[0])
        return self.tower(pixel_values, grid)


def pair_forward(model: Any, batch: dict,
                 forward: Callable[[Any, dict], torch.Tensor] = model_forward) -> torch.Tensor:
    """``forward(model, batch)`` with the tower run once per pair on the first stage (see the
    module docstring); unchanged elsewhere or where the batch has no pair media."""
    m = unwrap(model)
    vision = getattr(m.family, "vision", None)
    if (batch.get("pair_media") is None or not m.pre_process or m.vision_model is None
            or vision is None):
        return forward(model, batch)
    if vision.merge is not None:
        return _merge_forward(m, model, batch, forward)
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


def _merge_forward(m: Any, model: Any, batch: dict,
                   forward: Callable[[Any, dict], torch.Tensor]) -> torch.Tensor:
    """A family with its own merge: for this forward the model's family spec is a copy whose
    merge receives a :class:`SharedTower` around the tower it is given."""
    family, vision = m.family, m.family.vision
    merge = vision.merge

    def shared_merge(tower, emb, input_ids, media, hf_config):  # noqa: ANN001 - merge signature
        return merge(SharedTower(tower, batch, vision.media), emb, input_ids, media, hf_config)

    m.family = dataclasses.replace(family, vision=dataclasses.replace(vision,
                                                                      merge=shared_merge))
    try:
        return forward(model, batch)
    finally:
        m.family = family
