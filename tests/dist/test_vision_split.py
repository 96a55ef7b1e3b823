"""The vision tower divided over TP / CP ranks (mvlm.models.vision_parallel) equals one rank.

One two-rank launch (``_vision_split_worker.py``) runs the single-rank references, then TP2 and
CP2 with the split, on tiny Qwen2-VL and Qwen2.5-VL: one, two and three images of different sizes,
a text-only micro-batch and three images with the ViT frozen. Features, loss and every parameter
gradient within 1e-6 of the reference (max|diff| / max(1, max|ref|); measured 2026-12-02:
features bit-identical, vision gradients <= 6.2e-7, all gradients <= 7.5e-7 -- the decoder's
TP rounding, which the split does not touch). The vision path's counted FLOPs (forward +
backward, two equal images) at TP2 <= 0.55x TP1 per rank (measured 0.500). Without the TP
gradient sum the vision gradients are off by 0.7-1.0 (checked by hand), so the bar bites.
The partition itself is checked in-process.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from mvlm.models.vision_parallel import balanced_blocks, item_rows

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize(("costs", "parts", "blocks"), [
    ([16, 24, 48], 2, [(0, 2), (2, 3)]),       # 40 | 48
    ([48, 16, 24], 2, [(0, 1), (1, 3)]),       # 48 | 40
    ([24], 2, [(0, 1), (1, 1)]),               # one image: the second rank has none
    ([], 2, [(0, 0), (0, 0)]),                 # text only
    ([4, 4, 4], 2, [(0, 2), (2, 3)]),          # odd count
    ([1, 1, 1, 1], 4, [(0, 1), (1, 2), (2, 3), (3, 4)]),
    ([10, 1, 1], 4, [(0, 1), (1, 3), (3, 3), (3, 3)]),
])
def test_balanced_blocks(costs: list[int], parts: int, blocks: list[tuple[int, int]]) -> None:
    got = balanced_blocks(costs, parts)
    assert got == blocks
    # contiguous, covering, largest block minimal (brute force over all cut points)
    import itertools

    assert [a for a, _ in got][1:] == [b for _, b in got][:-1]
    best = min(max(sum(costs[a:b]) for a, b in zip((0, *cut), (*cut, len(costs))))
               for cut in itertools.combinations_with_replacement(range(len(costs) + 1),
                                                                  parts - 1))
    assert max(sum(costs[a:b]) for a, b in got) == best


def test_item_rows_checks_the_grid() -> None:
    import torch

    px = torch.zeros(40, 8)
    assert item_rows(px, torch.tensor([[1, 4, 4], [1, 4, 6]])) == [16, 24]
    assert item_rows(px[:3], None) == [1, 1, 1]
    with pytest.raises(ValueError, match="grid covers 16 rows but pixel_values has 40"):
        item_rows(px, torch.tensor([[1, 4, 4]]))


def test_vision_split_tp2_cp2_equal_one_rank(tmp_path: Path) -> None:
    from helpers import launch_worker

    p = launch_worker(HERE / "_vision_split_worker.py", 2, [tmp_path], timeout=900)
    print("\n".join(x for x in p.stdout.splitlines() if x.startswith("[")))
