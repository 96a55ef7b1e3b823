"""The vision tower once per preference pair for families with their own ``VisionSpec.merge``
(LLaVA-NeXT / OneVision, Qwen2.5-Omni): :func:`mvlm.train.objectives.pair_media.pair_forward`
hands the merge a :class:`SharedTower`, which runs the tower on each pair's first copy of the
media and repeats the per-row features, so the merge's own per-image packing sees what the tower
gives on the duplicated media.

In-process, no model: a stand-in tower (items independent, rows-per-item from the grid, a
trainable weight) and a stand-in merge with LLaVA-NeXT's shape (per-tile features packed per
image with a trailing newline row, read from the duplicated grid), swapped into a copy of the
registered ``llava_next`` family spec the way ``pair_forward`` swaps it. Asserted: features and
gradients equal the tower on the duplicated media (fp64, 1e-12), the tower saw half the rows,
the model's family spec is restored afterwards, media without pair bookkeeping pass through.
"""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import torch

from mvlm.models.registry import get_family
from mvlm.train.objectives.pair_media import SharedTower, pair_forward

TILE_ROWS = 2  # pixel rows per tile, merged into one feature row (like Qwen-VL's 2x2 merger)


def _batch() -> tuple[dict, torch.Tensor]:
    """Three pairs: 1 image of 3 tiles, none, 2 images of 1 and 2 tiles; each pair's media twice
    in a row (the collator's layout) and its pair_media bookkeeping."""
    g = torch.Generator().manual_seed(0)
    tiles = [[3], [], [1, 2]]
    px, grid = [], []
    for pair in tiles:
        own = [torch.randn(n * TILE_ROWS, 6, generator=g, dtype=torch.float64) for n in pair]
        for _ in range(2):
            px += own
            grid += [[n, 1, 1] for n in pair]
    rows = [sum(pair) * TILE_ROWS for pair in tiles]
    batch = {"pixel_values": torch.cat(px), "image_grid_thw": torch.tensor(grid),
             "pair_media": {"pixel_values": {"rows": rows, "items": [len(p) for p in tiles]}}}
    w = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    return batch, w


def _tower(w: torch.Tensor, seen: list[int]):
    def tower(px: torch.Tensor, grid: torch.Tensor | None) -> torch.Tensor:
        seen.append(int(px.shape[0]))
        if grid is not None:
            assert int(grid.prod(-1).sum()) * TILE_ROWS == px.shape[0]
        return (px @ w).reshape(-1, TILE_ROWS, 4).sum(1).tanh()
    return tower


def _merge(tower, emb, input_ids, media, hf_config):  # noqa: ANN001 - VisionSpec.merge
    """Per image: its tiles' features then a newline row (read from the duplicated grid)."""
    feats = tower(media["pixel_values"], media["image_grid_thw"])
    out = []
    for part in torch.split(feats, media["image_grid_thw"][:, 0].tolist()):
        out += [part, torch.ones(1, part.shape[1], dtype=part.dtype)]
    return torch.cat(out) + 0 * emb.sum()


def test_shared_tower_equals_tower_on_both_copies():
    batch, w = _batch()
    seen: list[int] = []
    want = _merge(_tower(w, seen), torch.zeros(1), None, batch, None)
    shared = SharedTower(_tower(w, seen), batch, get_family("llava_next").vision.media)
    got = _merge(shared, torch.zeros(1), None, batch, None)
    assert seen == [24, 12] and shared.rows_in == 12
    assert torch.equal(got, want)
    g = torch.randn_like(want)
    (gw,) = torch.autograd.grad((want * g).sum(), w)
    (gs,) = torch.autograd.grad((got * g).sum(), w)
    assert torch.allclose(gw, gs, rtol=1e-12, atol=1e-12)
    # a tensor the batch's pair bookkeeping does not describe (e.g. Omni's audio) passes through
    other = torch.randn(4, 6, dtype=torch.float64)
    assert torch.equal(shared(other, None), _tower(w, seen)(other, None))


def test_pair_forward_swaps_the_merge_for_this_forward_only():
    batch, w = _batch()
    seen: list[int] = []
    family = get_family("llava_next")
    family = dataclasses.replace(family, vision=dataclasses.replace(family.vision, merge=_merge))
    m = SimpleNamespace(family=family, pre_process=True, vision_model=_tower(w, seen))

    def forward(model, b):  # what VLMModel.embed does with a family merge
        return model.family.vision.merge(model.vision_model, torch.zeros(1), None, b, None)

    got = pair_forward(m, batch, forward)
    assert m.family is family and seen == [12]
    seen.clear()
    assert torch.equal(got, forward(m, batch)) and seen == [24]
