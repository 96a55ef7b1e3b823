"""Qwen3-VL chat template and vision-token expansion, equal to the HF processor's output.

Images as Qwen2-VL (``<|vision_start|><|image_pad|>*N<|vision_end|>``, 16 px patches read off
the processor). Videos are laid out frame by frame (per merged temporal patch): the rendered
``<|vision_start|><|video_pad|><|vision_end|>`` becomes, for each frame, the text timestamp
``<{t:.1f} seconds>`` followed by ``<|vision_start|><|video_pad|>*n<|vision_end|>``, where t is
the mean time of the frame's source frames (``frame index / fps``), HF's
``Qwen3VLProcessor`` rule; like that processor, only the pad is replaced, the rendered markers stay
around the frames. mvlm's clips hold frames already sampled at ``sample_fps``, so frame k is at
``k / sample_fps`` (exact for frame lists and uniform sampling). Positions treat every frame as
its own block (``position_ids``).
"""
from __future__ import annotations

import numpy as np
import torch

from mvlm.data.errors import BadSampleError
from mvlm.data.mrope import get_rope_index
from mvlm.models.qwen2_vl.template import Qwen2VLTemplate


def frame_timestamps(n_frames: int, fps: float, temporal_patch: int) -> list[float]:
    """Seconds of each merged frame: the mean of its first and last source frame's time
    (source frames ``0..n_frames-1``, the last repeated up to a multiple of the patch)."""
    idx = list(range(n_frames))
    while len(idx) % temporal_patch:
        idx.append(idx[-1])
    t = [i / fps for i in idx]
    return [(t[i] + t[i + temporal_patch - 1]) / 2 for i in range(0, len(t), temporal_patch)]


class Qwen3VLTemplate(Qwen2VLTemplate):
    """Qwen3-VL: Qwen2-VL's images; videos as timestamped frames; per-frame mRoPE blocks."""

    family = "qwen3_vl"

    def process_vision(self, prepared):
        out = super().process_vision(prepared)
        # The timestamps need each video's fps and frame count (HF reads them off the video
        # metadata); keep them beside the grid, as second_per_grid_ts carries time for Qwen2.5.
        for j, p in enumerate(prepared):
            if p.videos:
                out[j].pop("second_per_grid_ts", None)
                out[j]["_video_times"] = [
                    frame_timestamps(len(v.frames), v.sample_fps, self.temporal_patch)
                    for v in p.videos]
        return out

    def _frame_ids(self, times: list[float], per_frame: int) -> np.ndarray:
        parts: list[int] = []
        for t in times:
            parts += self.tokenizer.encode(f"<{t:.1f} seconds>", add_special_tokens=False)
            parts += [self.vision_start_id] + [self.video_token_id] * per_frame + \
                [self.vision_end_id]
        return np.asarray(parts, dtype=np.int64)

    def expand_vision(self, ids, train, vision):
        times = vision.get("_video_times")
        grid = vision.get("video_grid_thw")
        if grid is None:
            return super().expand_vision(ids, train, vision)
        vision = dict(vision)
        vgrid = vision.pop("video_grid_thw")
        ids, train, vision = super().expand_vision(
            np.where(ids == self.video_token_id, -1, ids), train, vision)
        # Each single <|video_pad|> (now -1) becomes the timestamped frames.
        pads = np.flatnonzero(ids == -1)
        if len(pads) != len(vgrid):
            raise BadSampleError("media_count_mismatch",
                                 f"{len(pads)} video placeholders after rendering, but "
                                 f"{len(vgrid)} videos (is a literal <|video_pad|> in text?)")
        if times is None or len(times) != len(vgrid):
            raise BadSampleError("unsupported_media", "a Qwen3-VL video needs its frame times "
                                 "(fps): encode it with the template")
        out_ids, out_train, prev, spans, at = [], [], 0, [], 0
        for k, p in enumerate(pads.tolist()):
            t, h, w = (int(x) for x in vgrid[k])
            s, e = p, p + 1
            # HF keeps the rendered markers around the frames: the truncation block takes them
            outer = (int(s > 0 and ids[s - 1] == self.vision_start_id),
                     int(e < len(ids) and ids[e] == self.vision_end_id))
            if len(times[k]) != t:
                raise BadSampleError("media_count_mismatch",
                                     f"video {k}: {len(times[k])} frame times for {t} frames")
            block = self._frame_ids(times[k], h * w // self.merge ** 2)
            at += s - prev
            spans.append((at - outer[0], at + len(block) + outer[1]))
            at += len(block)
            out_ids += [ids[prev:s], block]
            out_train += [train[prev:s], np.zeros(len(block), dtype=bool)]
            prev = e
        out_ids.append(ids[prev:])
        out_train.append(train[prev:])
        vision["video_grid_thw"] = vgrid
        vision["_video_blocks"] = spans  # (start, end) of each video's frames, for truncation
        return np.concatenate(out_ids), np.concatenate(out_train), vision

    def vision_blocks(self, ids, vision):
        """Images as Qwen2-VL; a video is one block from its first timestamp to its last
        frame's end marker (truncation keeps or drops it whole)."""
        blocks = super().vision_blocks(ids, {k: v for k, v in vision.items()
                                             if k != "video_grid_thw"})
        blocks += [(s, e, "video", k) for k, (s, e) in
                   enumerate(vision.get("_video_blocks") or ())]
        return sorted(blocks)

    def position_ids(self, ids, vision):
        vg = vision.get("video_grid_thw")
        if vg is not None:
            vg = torch.repeat_interleave(torch.as_tensor(vg), torch.as_tensor(vg)[:, 0], dim=0)
            vg[:, 0] = 1
        return get_rope_index(
            ids, image_token_id=self.image_token_id, video_token_id=self.video_token_id,
            spatial_merge_size=self.merge, image_grid_thw=vision.get("image_grid_thw"),
            video_grid_thw=vg)
