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

TOL_GRAD = 1e-5  # fp32 tower gradients, see test_llava_next_real_merge_tower_once
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


def test_llava_next_real_merge_tower_once(tiny_ckpt, tmp_path):
    """The real LLaVA-NeXT path: the tiny checkpoint's tower (ViT + projector) and its merge
    (tiles packed per image by transformers' ``pack_image_features``, newline rows) on a
    micro-batch of two collated pairs (one image of 3+ tiles, one text-only) from the family's
    template: the merged embeddings and the tower's gradients equal the tower on both copies
    (embeddings 1e-6 absolute; gradients 1e-5 relative, floor 1, measured 6.6e-7), with half
    the tiles through the tower."""
    import numpy as np
    from PIL import Image
    from transformers import AutoConfig

    from mvlm.data import preference as P
    from mvlm.data.template import TemplateConfig, get_template

    ckpt = tiny_ckpt("llava_next")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 90, 3), dtype=np.uint8)
                    ).save(tmp_path / "a.png")
    tpl = get_template(ckpt, cfg=TemplateConfig(max_length=4096, task="preference"))
    rows = [{"images": ["a.png"], "messages": [{"role": "user", "content": "<image>Colour?"}],
             "chosen": "Red.", "rejected": "Green."},
            {"messages": [{"role": "user", "content": "2+2?"}], "chosen": "4", "rejected": "5"}]
    b = P.collate_pairs(P.encode_preference_rows(tpl, rows, str(tmp_path)), tpl.pad_token_id)
    family = get_family("llava_next")
    hf_config = AutoConfig.from_pretrained(ckpt)
    torch.manual_seed(0)
    tower = family.vision.build(hf_config, torch.float32, "cpu")
    media = {k: b[k] for k in ("pixel_values", "image_grid_thw", "image_sizes")}
    ids = b["input_ids"]
    emb = torch.zeros(ids.shape[1], ids.shape[0], hf_config.text_config.hidden_size)
    tiles = int(b["image_grid_thw"][:, 0].sum())
    assert tiles >= 6 and b["pair_media"]["pixel_values"]["items"] == [1, 0]

    def run(t) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        tower.zero_grad()
        out = family.vision.merge(t, emb, ids, media, hf_config)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in tower.named_parameters()
                              if p.grad is not None}

    want, gw = run(tower)
    shared = SharedTower(tower, b, family.vision.media)
    got, gs = run(shared)
    assert shared.rows_in * 2 == tiles
    assert torch.allclose(got, want, rtol=0, atol=1e-6)
    assert gw.keys() == gs.keys() and gw
    # the backward sums both copies' feature gradients before the tower (one pass over the
    # tiles) instead of after it: another fp32 summation order of the weight gradients (relative,
    # floor 1: the attention's key biases have gradients that are 0 up to rounding)
    worst = max(float((gw[n] - gs[n]).abs().max() / max(1.0, float(gw[n].abs().max())))
                for n in gw)
    print(f"llava_next tower gradients, once vs both copies: max relative difference {worst:.2e}")
    assert worst <= TOL_GRAD
