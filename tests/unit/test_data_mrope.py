"""mRoPE positions computed per sample equal HF's get_rope_index (transformers 5.24)."""
import functools
import types

import pytest
import torch
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

from mvlm.data.mrope import get_rope_index, text_position_ids

IMG, VID, VS, VE = 151655, 151656, 151652, 151653


def _hf(cls, cfg, ids, image_grid=None, video_grid=None, spg=None):
    """Call the HF method on a stub 'self' (it only reads config and a static helper)."""
    stub = types.SimpleNamespace(config=cfg, get_vision_position_ids=functools.partial(
        cls.get_vision_position_ids, None))
    ids_t = torch.tensor([ids])
    mm = torch.zeros_like(ids_t)
    mm[ids_t == IMG] = 1
    mm[ids_t == VID] = 2
    kw = {"second_per_grid_ts": spg} if cls is Qwen2_5_VLModel else {}
    pos, _ = cls.get_rope_index(stub, ids_t, mm, image_grid, video_grid, **kw)
    return pos[:, 0]


def _sample(blocks, merge=2):
    """Build ids: text runs and vision blocks given as ('i'|'v', (t,h,w))."""
    ids, igrid, vgrid = [1, 2, 3], [], []
    for kind, g in blocks:
        n = g[0] * (g[1] // merge) * (g[2] // merge)
        ids += [VS] + [IMG if kind == "i" else VID] * n + [VE, 7, 8]
        (igrid if kind == "i" else vgrid).append(g)
    ids += [9, 10]
    def t(x):
        return torch.tensor(x, dtype=torch.long) if x else None
    return ids, t(igrid), t(vgrid)


CASES = [
    [("i", (1, 4, 6))],
    [("i", (1, 4, 6)), ("i", (1, 8, 2))],
    [("v", (3, 4, 4))],
    [("i", (1, 2, 2)), ("v", (2, 6, 4)), ("i", (1, 10, 4)), ("v", (4, 2, 2))],
]


@pytest.mark.parametrize("blocks", CASES)
def test_qwen2_vl_matches_hf(blocks):
    cfg = Qwen2VLConfig(vision_config={"spatial_merge_size": 2})
    ids, ig, vg = _sample(blocks)
    ours = get_rope_index(ids, image_token_id=IMG, video_token_id=VID, spatial_merge_size=2,
                          image_grid_thw=ig, video_grid_thw=vg)
    assert torch.equal(ours, _hf(Qwen2VLModel, cfg, ids, ig, vg))


@pytest.mark.parametrize("blocks", CASES)
@pytest.mark.parametrize("spg", [None, "mixed"])
def test_qwen2_5_vl_matches_hf_with_second_per_grid(blocks, spg):
    cfg = Qwen2_5_VLConfig(vision_config={"spatial_merge_size": 2, "tokens_per_second": 25})
    ids, ig, vg = _sample(blocks)
    nv = 0 if vg is None else len(vg)
    ts = None if spg is None or nv == 0 else torch.tensor([0.5, 1.0 / 3, 2.0, 0.8][:nv])
    ours = get_rope_index(ids, image_token_id=IMG, video_token_id=VID, spatial_merge_size=2,
                          image_grid_thw=ig, video_grid_thw=vg, second_per_grid_ts=ts,
                          tokens_per_second=25)
    assert torch.equal(ours, _hf(Qwen2_5_VLModel, cfg, ids, ig, vg, ts))


def test_text_only():
    assert torch.equal(get_rope_index([5, 6, 7], image_token_id=IMG, video_token_id=VID,
                                      spatial_merge_size=2), text_position_ids(3))
