"""3-D multimodal RoPE position ids (Qwen2-VL / Qwen2.5-VL), computed per sample.

Why per sample: HF computes mRoPE positions for a padded batch inside the model. With
padding-free packing several samples share one row, and each must restart at 0 exactly as if it
were alone; computing positions at encode time, per sample, makes packing a plain concatenation.
The result equals ``Qwen2VLModel.get_rope_index`` / ``Qwen2_5_VLModel.get_rope_index`` of
transformers 5.24 for the same single sample (tested against the HF function):

* text tokens: consecutive positions, the same on all three axes;
* a vision block with grid (t, h, w) and merge size m contributes t*(h/m)*(w/m) tokens whose
  (temporal, height, width) positions are (start + floor(ti * interval), start + hi, start + wi);
  ``interval`` is 1 for images and for Qwen2-VL videos, and ``tokens_per_second *
  second_per_grid_t`` for Qwen2.5-VL videos;
* the next text token starts at ``start + max(h, w) / m``.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def text_position_ids(length: int) -> torch.Tensor:
    """[3, L] positions for a text-only sample: 0..L-1 on every axis."""
    return torch.arange(length, dtype=torch.long).unsqueeze(0).expand(3, -1).contiguous()


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of each maximal run of True in ``mask``."""
    if not mask.any():
        return []
    d = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist()))


def get_rope_index(input_ids: Sequence[int] | np.ndarray | torch.Tensor, *,
                   image_token_id: int, video_token_id: int, spatial_merge_size: int,
                   image_grid_thw: torch.Tensor | None = None,
                   video_grid_thw: torch.Tensor | None = None,
                   second_per_grid_ts: torch.Tensor | Sequence[float] | None = None,
                   tokens_per_second: float | None = None) -> torch.Tensor:
    """Return LongTensor [3, L] mRoPE positions for ONE unpadded sample.

    ``tokens_per_second=None`` selects Qwen2-VL behaviour (no temporal scaling for video);
    a number selects Qwen2.5-VL's (video temporal positions spaced by tokens_per_second *
    second_per_grid_t, each grid defaulting to 1 s when ``second_per_grid_ts`` is None).
    """
    ids = np.asarray(input_ids.tolist() if isinstance(input_ids, torch.Tensor) else input_ids,
                     dtype=np.int64)
    n = ids.shape[0]
    kinds = np.zeros(n, dtype=np.int8)
    kinds[ids == image_token_id] = 1
    kinds[ids == video_token_id] = 2
    if not kinds.any():
        return text_position_ids(n)
    m = spatial_merge_size
    grids = {1: [] if image_grid_thw is None else [tuple(int(x) for x in g)
                                                    for g in image_grid_thw],
             2: [] if video_grid_thw is None else [tuple(int(x) for x in g)
                                                    for g in video_grid_thw]}
    used = {1: 0, 2: 0}
    if second_per_grid_ts is None:
        spg = None
    else:
        spg = torch.as_tensor(second_per_grid_ts)
    # Walk over vision blocks in order; a run of pad tokens may hold several adjacent blocks.
    blocks: list[tuple] = []  # (start, end, kind, grid, index among that kind)
    for kind in (1, 2):
        for s, e in _runs(kinds == kind):
            pos = s
            while pos < e:
                if used[kind] >= len(grids[kind]):
                    raise ValueError(f"{'image' if kind == 1 else 'video'} tokens without a grid:"
                                     f" more placeholder blocks than grids")
                g = grids[kind][used[kind]]
                vid_idx = used[kind]
                used[kind] += 1
                cnt = g[0] * (g[1] // m) * (g[2] // m)
                if pos + cnt > e:
                    raise ValueError(f"vision block at {pos} has {e - pos} tokens, grid {g} "
                                     f"needs {cnt}")
                blocks.append((pos, pos + cnt, kind, g, vid_idx))
                pos += cnt
    blocks.sort()
    out = torch.empty(3, n, dtype=torch.long)
    cur = 0
    prev_end = 0
    for s, e, kind, (t, h, w), idx in blocks:
        if s > prev_end:
            tl = s - prev_end
            out[:, prev_end:s] = torch.arange(cur, cur + tl).unsqueeze(0)
            cur += tl
        lh, lw = h // m, w // m
        if kind == 2 and tokens_per_second is not None:
            sec = spg[idx] if spg is not None else 1
            interval = tokens_per_second * sec
        else:
            interval = 1
        tpos = (torch.arange(t) * interval).long() + cur
        hpos = torch.arange(lh) + cur
        wpos = torch.arange(lw) + cur
        tt, hh, ww = torch.meshgrid(tpos, hpos, wpos, indexing="ij")
        out[:, s:e] = torch.stack([tt, hh, ww]).reshape(3, -1)
        cur += max(h, w) // m
        prev_end = e
    if prev_end < n:
        out[:, prev_end:] = torch.arange(cur, cur + n - prev_end).unsqueeze(0)
    return out
