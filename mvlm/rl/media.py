"""Per-prompt media for RL: split a collated micro-batch's media back into rows, and join rows'
media into a training micro-batch.

The collator (:mod:`mvlm.data.collate`) concatenates every media key of a micro-batch over its
samples (Qwen-VL: ``pixel_values`` [N_patches, D] and ``image_grid_thw`` [N_images, 3]). A
rollout engine takes one prompt at a time (:class:`mvlm.rl.rollout.base.RolloutPrompt.media`),
and each GRPO training row (prompt + one completion) needs its prompt's media again, so the
objective needs the inverse of that concatenation.

The split reads only the family's :class:`~mvlm.models.registry.MediaKind` declarations, no
family code: a row owns the media items whose placeholder tokens it holds, in order. An item's
share of the feature rows is proportional to the product of its grid (Qwen-VL: ``t*h*w``
patches; any-resolution LLaVA: ``(tiles, 1, 1)``, one row per tile); a kind without a grid has
one feature row per item (LLaVA-1.5: an image; InternVL: a tile, every tile the same number of
tokens). An item's placeholder count is proportional to its grid too (Qwen-VL:
``t*h*w / merge**2``), except for kinds declared ``tokens_follow_grid=False`` (LLaVA-NeXT /
OneVision tiles are unpadded and get a newline per row, so the count depends on the image's size):
there each item's placeholders are one run of consecutive tokens, and each run is read as one
item's count (a batch whose runs do not number its items is refused). A row whose placeholders do
not add up to whole items is refused, naming the row.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch


def placeholder_runs(ids: torch.Tensor, token_id: int) -> list[list[int]]:
    """Lengths of the maximal runs of ``token_id`` in each row of ``ids`` [b, s], in order."""
    out = []
    for row in (ids == token_id).long():
        edges = torch.diff(row, prepend=row.new_zeros(1), append=row.new_zeros(1))
        starts, ends = (edges == 1).nonzero().flatten(), (edges == -1).nonzero().flatten()
        out.append((ends - starts).tolist())
    return out


def _item_sizes(kind: Any, batch: Mapping[str, Any], n_tokens: int, runs: list[int]
                ) -> tuple[list[int], list[int]]:
    """(placeholder tokens, feature rows) per item of one media kind in ``batch``; ``runs`` are
    the placeholder runs of all rows in order."""
    feats = batch[kind.features_key]
    if kind.grid_key is not None and batch.get(kind.grid_key) is not None:
        units = [int(torch.prod(g)) for g in batch[kind.grid_key].long()]
    else:
        units = [1] * int(feats.shape[0])
    total = sum(units)
    if total == 0:
        raise ValueError(f"{kind.features_key}: the micro-batch's media have no items")
    if getattr(kind, "tokens_follow_grid", True):
        tokens = [u * n_tokens // total for u in units]
    elif len(runs) == len(units):
        tokens = list(runs)
    else:
        raise ValueError(f"{kind.features_key}: {len(units)} {kind.name} items but {len(runs)} "
                         f"runs of {kind.name} placeholder tokens; a {kind.name}'s placeholder "
                         "count depends on its size, so each item must be one run of tokens "
                         f"(put text between adjacent {kind.name} tags)")
    rows = [u * int(feats.shape[0]) // total for u in units]
    if sum(tokens) != n_tokens or sum(rows) != int(feats.shape[0]):
        raise ValueError(f"{kind.features_key}: {n_tokens} placeholder tokens and "
                         f"{int(feats.shape[0])} feature rows do not split over the "
                         f"{len(units)} items in proportion to their grids")
    return tokens, rows


def split_media_rows(batch: Mapping[str, Any], family: Any, hf_config: Any
                     ) -> list[dict[str, torch.Tensor]]:
    """One media dict per row of ``batch`` (``{}`` for a row without media), each holding the
    family's keys restricted to that row's items, in the collator's layout."""
    ids = batch["input_ids"]
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(ids.shape[0])]
    token_ids = family.token_ids(hf_config) if family.is_vlm else {}
    for kind in family.media:
        if batch.get(kind.features_key) is None:
            continue
        runs = placeholder_runs(ids, token_ids[kind.name])
        per_row = [sum(r) for r in runs]
        tokens, rows = _item_sizes(kind, batch, int(sum(per_row)),
                                   [n for r in runs for n in r])
        item = row0 = 0
        for r, need in enumerate(per_row):
            first_item, first_row, got = item, row0, 0
            while got < need and item < len(tokens):
                got += tokens[item]
                row0 += rows[item]
                item += 1
            if got != need:
                raise ValueError(f"prompt row {r}: {need} {kind.name} placeholder tokens do not "
                                 f"match whole {kind.name} items ({got} tokens in items "
                                 f"{first_item}..{item - 1}); the row's media and its tags "
                                 "disagree")
            if need == 0:
                continue
            out[r][kind.features_key] = batch[kind.features_key][first_row:row0]
            for k in (kind.grid_key, *kind.extra_keys):
                if k is not None and batch.get(k) is not None:
                    out[r][k] = batch[k][first_item:item]
    return out


def join_media(rows: Sequence[Mapping[str, torch.Tensor]], device: Any = None
               ) -> dict[str, torch.Tensor]:
    """The collator's concatenation of per-row media (rows without a key are skipped)."""
    keys = sorted({k for r in rows for k, v in r.items() if v is not None})
    out = {}
    for k in keys:
        parts = [r[k] for r in rows if r.get(k) is not None]
        t = torch.cat(parts, dim=0)
        out[k] = t.to(device) if device is not None else t
    return out
