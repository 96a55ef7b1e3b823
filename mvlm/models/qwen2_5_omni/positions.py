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

``use_audio_in_video`` blocks (a video and its audio track, recognised from the tokens:
``<|vision_bos|><|audio_bos|>`` then the video's and the audio's tokens in time chunks, then
``<|audio_eos|><|vision_eos|>``): the two opening markers share one position, the video's
tokens are laid out as above and the audio's as ``arange`` from the same base, both cut into
chunks of ``position_id_per_seconds * seconds_per_chunk`` position values and interleaved chunk
by chunk (video first); the two closing markers share the position after the block's last chunk
(the last chunk's largest value + 1, as HF computes it, not the block's).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def chunk_bounds(values: torch.Tensor, per_chunk: int) -> list[tuple[int, int]]:
    """(start, end) slices of a non-decreasing ``values`` cut where a value reaches the next
    multiple of ``per_chunk`` (transformers' ``get_chunked_index``: at most one cut per token)."""
    out, start, chunk = [], 0, 1
    for i, v in enumerate(values.tolist()):
        if v >= chunk * per_chunk:
            out.append((start, i))
            start, chunk = i, chunk + 1
    out.append((start, len(values)))
    return out


def interleave_audio_in_video(video_pos: torch.Tensor, audio_len: int, base: int,
                              per_chunk: int) -> tuple[list[tuple[str, int]], list[torch.Tensor]]:
    """The token order (``("video"|"audio", count)`` runs) and the [3, n] positions of a video
    block interleaved with its audio track; ``video_pos`` [3, n_video] starts at ``base``."""
    audio_pos = torch.arange(audio_len).view(1, -1).expand(3, -1) + base
    v_chunks = chunk_bounds(video_pos[0] - base, per_chunk)
    a_chunks = chunk_bounds(audio_pos[0] - base, per_chunk)
    runs, parts = [], []
    for j in range(max(len(v_chunks), len(a_chunks))):
        for name, chunks, pos in (("video", v_chunks, video_pos), ("audio", a_chunks, audio_pos)):
            if j < len(chunks):
                s, e = chunks[j]
                runs.append((name, e - s))
                parts.append(pos[:, s:e])
    return runs, parts


def omni_rope_index(input_ids: Sequence[int] | np.ndarray | torch.Tensor, *, image_token_id: int,
                    video_token_id: int, spatial_merge_size: int, position_id_per_seconds: float,
                    image_grid_thw: torch.Tensor | None = None,
                    video_grid_thw: torch.Tensor | None = None,
                    second_per_grid_ts: torch.Tensor | Sequence[float] | None = None,
                    audio_token_id: int | None = None, audio_start_token_id: int | None = None,
                    seconds_per_chunk: float = 2.0,
                    ) -> tuple[torch.Tensor, int, int]:
    """([3, L] positions, images used, videos used) for ONE sample; the grids are consumed in
    order, one per placeholder block. With the audio token ids given, a video block opened by
    ``<|audio_bos|>`` is read as ``use_audio_in_video`` (see the module docstring)."""
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
        with_audio = (video and audio_start_token_id is not None and i > 0
                      and int(ids[i - 1]) == audio_start_token_id)
        grids = video_grid_thw if video else image_grid_thw
        k = n_vid if video else n_img
        if grids is None or k >= len(grids):
            raise ValueError(f"{'video' if video else 'image'} placeholder block at token {i} "
                             "without a grid: more blocks than grids")
        t, h, w = (int(x) for x in grids[k])
        lh, lw = h // m, w // m
        cnt = t * lh * lw
        if with_audio:
            i, cur = _audio_in_video_block(ids, out, i, cur, t, lh, lw, spg, n_vid,
                                           position_id_per_seconds, seconds_per_chunk,
                                           video_token_id, audio_token_id)
            n_vid += 1
            continue
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


def _audio_in_video_block(ids: torch.Tensor, out: torch.Tensor, i: int, cur: int, t: int, lh: int,
                          lw: int, spg: torch.Tensor | None, k: int, pps: float,
                          seconds_per_chunk: float, video_token_id: int, audio_token_id: int
                          ) -> tuple[int, int]:
    """Fill ``out`` for the interleaved video + audio block whose first token is ``i`` (the
    ``<|vision_bos|><|audio_bos|>`` before it hold ``cur - 2``, ``cur - 1`` as text); returns
    (next token, next position)."""
    # <|vision_bos|> and <|audio_bos|> share one position
    base = cur - 2
    out[:, i - 1] = base
    base += 1
    sec = spg[k].float() if spg is not None else torch.tensor(1.0)
    t_idx = (torch.arange(t) * sec * pps).long()
    video_pos = torch.stack([t_idx.view(-1, 1, 1).expand(t, lh, lw).flatten(),
                             torch.arange(lh).view(1, -1, 1).expand(t, lh, lw).flatten(),
                             torch.arange(lw).view(1, 1, -1).expand(t, lh, lw).flatten()]) + base
    end = i
    while end < len(ids) and int(ids[end]) in (video_token_id, audio_token_id):
        end += 1
    audio_len = int((ids[i:end] == audio_token_id).sum())
    runs, parts = interleave_audio_in_video(video_pos, audio_len, base,
                                            int(pps * seconds_per_chunk))
    j = i
    for (name, c), pos in zip(runs, parts):
        tok = video_token_id if name == "video" else audio_token_id
        if not bool((ids[j:j + c] == tok).all()):
            raise ValueError(f"audio-in-video block at token {i}: expected {c} {name} tokens at "
                             f"{j} (grid {(t, lh, lw)}, {audio_len} audio tokens)")
        out[:, j:j + c] = pos
        j += c
    if j != end:
        raise ValueError(f"audio-in-video block at token {i}: {end - i} media tokens but the "
                         f"video grid and the audio give {j - i}")
    # <|audio_eos|><|vision_eos|> share the position after the last chunk
    close = int(parts[-1].max()) + 1
    for q in (end, end + 1):
        if q < len(ids):
            out[:, q] = close
    return min(end + 2, len(ids)), close + 1
