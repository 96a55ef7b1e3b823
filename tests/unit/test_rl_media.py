"""mvlm.rl.media: a collated micro-batch's media split back into per-row media and joined again
(Qwen2-VL's keys from the family registry): rows own the items whose placeholder tokens they
hold, in order; a row whose tokens do not make whole items is refused, naming the row."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mvlm.models.registry import get_family
from mvlm.rl.media import join_media, split_media_rows

IMG, VID = 7, 8
CFG = SimpleNamespace(image_token_id=IMG, video_token_id=VID)


def _batch(tokens_per_row):
    """Rows with the given image-token counts; items of grid (1, 2, 2 * n) -> n tokens each
    (merge 2x2), patch rows numbered so that a split can be checked."""
    grids, width = [], 12
    ids = torch.ones(len(tokens_per_row), width, dtype=torch.long)
    for r, items in enumerate(tokens_per_row):
        ids[r, :sum(items)] = IMG
        grids += [[1, 2, 2 * n] for n in items]
    grid = torch.tensor(grids)
    n_rows = int(grid.prod(-1).sum())
    return {"input_ids": ids, "image_grid_thw": grid,
            "pixel_values": torch.arange(n_rows, dtype=torch.float32)[:, None].repeat(1, 3)}


def test_split_and_join():
    fam = get_family("qwen2_vl")
    b = _batch([[1, 2], [], [3]])
    rows = split_media_rows(b, fam, CFG)
    assert rows[1] == {}
    assert rows[0]["image_grid_thw"].tolist() == [[1, 2, 2], [1, 2, 4]]
    assert rows[0]["pixel_values"][:, 0].tolist() == list(range(12))
    assert rows[2]["image_grid_thw"].tolist() == [[1, 2, 6]]
    assert rows[2]["pixel_values"][:, 0].tolist() == list(range(12, 24))
    joined = join_media(rows)
    assert set(joined) == {"pixel_values", "image_grid_thw"}
    assert torch.equal(joined["pixel_values"], b["pixel_values"])
    assert torch.equal(joined["image_grid_thw"], b["image_grid_thw"])
    # a training micro-batch repeats each row's media per completion
    two = join_media([rows[2], rows[2]])
    assert two["pixel_values"].shape[0] == 24 and two["image_grid_thw"].shape[0] == 2


def test_text_batch_and_mismatch():
    fam = get_family("qwen2_vl")
    assert split_media_rows({"input_ids": torch.ones(2, 4, dtype=torch.long)}, fam, CFG) == [{}, {}]
    b = _batch([[2], [2]])
    b["input_ids"][1, 1] = 1  # one placeholder token moves from row 1 to row 0
    b["input_ids"][0, 2] = IMG
    with pytest.raises(ValueError, match="prompt row 0: 3 image placeholder tokens"):
        split_media_rows(b, fam, CFG)
    b["input_ids"][0, 2] = 1  # 3 tokens for 2 items of 2: not in proportion to the grids
    with pytest.raises(ValueError, match="in proportion"):
        split_media_rows(b, fam, CFG)
