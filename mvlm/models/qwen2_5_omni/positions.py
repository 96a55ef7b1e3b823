"""Qwen2.5-Omni thinker mRoPE positions for one unpadded sample, as transformers 5.24's
``Qwen2_5OmniPreTrainedModelForConditionalGeneration.get_rope_index`` computes them for audio,
images and videos given as separate items.

It differs from Qwen2.5-VL's (``mvlm.data.mrope``) in two ways, both checked against the HF
function in ``tests/unit/test_qwen2_5_omni.py``:

* after a vision block the next token starts at the block's largest position on ANY axis + 1,
  temporal included, so a video's time span (``position_id_per_seconds`` per second) pushes the
  following text further than its height/width would;
* temporal positions are ``floor(t * second_per_grid * position_id_per_seconds)`` for videos and
  ``t * position_id_per_seconds`` for images, computed in float32 as HF does.

Audio tokens (and the text, ``<|audio_bos|>``/``<|audio_eos|>`` and vision markers) advance by
one on all three axes.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def omni_rope_index(input_ids: Sequence[int] | np.ndarray | torch.Tensor, *, image_token_id: int,
                    video_token_id: int, spatial_merge_size: int, position_id_per_seconds: float,
                    image_grid_thw: torch.Tensor | None = None,
                    video_grid_thw: torch.Tensor | None = None,
                    second_per_grid_ts: torch.Tensor | Sequence[float] | None = None,
                    ) -> tuple[torch.Tensor, int, int]:
    """([3, L] positions, images used, videos used) for ONE sample; the grids are consumed in
    order, one per placeholder block."""
    ids = torch.as_tensor(np.asarray(input_ids.tolist() if isinstance(input_ids, torch.Tensor)
                                     else input_ids, dtype=np.int64))
    n = int(ids.shape[0])
    out = torch.empty(3, n, dtype=torch.long)
    spg = None if second_per_grid_ts is None else torch.as_tensor(second_per_grid_ts)
    m = spatial_merge_size
    cur = i = n_img = n_vid = 0
    while i < n:
        tok = int(ids[i])
        if tok not in (image_token_id, video_token_id):
            out[:, i] = cur
            cur += 1
            i += 1
            continue
        video = tok == video_token_id
        grids = video_grid_thw if video else image_grid_thw
        k = n_vid if video else n_img
        if grids is None or k >= len(grids):
            raise ValueError(f"{'video' if video else 'image'} placeholder block at token {i} "
                             "without a grid: more blocks than grids")
        t, h, w = (int(x) for x in grids[k])
        lh, lw = h // m, w // m
        cnt = t * lh * lw
        if i + cnt > n or not bool((ids[i:i + cnt] == tok).all()):
            raise ValueError(f"vision block at token {i}: grid {(t, h, w)} needs {cnt} "
                             "placeholders in a row")
        if video:
            sec = spg[k].float() if spg is not None else torch.tensor(1.0)
            t_idx = (torch.arange(t) * sec * position_id_per_seconds).long()
        else:
            t_idx = (torch.arange(t) * 1 * position_id_per_seconds).long()
        block = torch.stack([t_idx.view(-1, 1, 1).expand(t, lh, lw).flatten(),
                             torch.arange(lh).view(1, -1, 1).expand(t, lh, lw).flatten(),
                             torch.arange(lw).view(1, 1, -1).expand(t, lh, lw).flatten()]) + cur
        out[:, i:i + cnt] = block
        cur = int(block.max()) + 1
        i += cnt
        n_vid += video
        n_img += not video
    return out, n_img, n_vid
