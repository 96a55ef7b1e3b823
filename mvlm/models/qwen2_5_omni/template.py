"""Qwen2.5-Omni thinker chat template and media-token expansion, equal to the HF processor.

Images and videos are Qwen2.5-VL's (same image/video processors, ``t*h*w/merge^2`` pads), under
Omni's token names: ``<|vision_bos|><|IMAGE|><|vision_eos|>`` / ``<|VIDEO|>``. Audio parts render
as ``<|audio_bos|><|AUDIO|><|audio_eos|>``; the waveform (ms-swift rows: ``"audios": [path,
...]``, decoded to mono at the feature extractor's rate by :func:`mvlm.data.media.load_audio`)
goes through the checkpoint's Whisper feature extractor padded to its window, as
``Qwen2_5OmniProcessor`` does, and the single pad is repeated once per audio-encoder output frame
(the two stride-2 reductions of the mel length). The sample carries HF's ``input_features``
[n_audio, mel, frames] and ``feature_attention_mask`` [n_audio, frames]. Truncation never cuts an
audio block either. Positions: the thinker's mRoPE (``positions.py``), the same function the
model side uses.

``USE_AUDIO_IN_VIDEO=true`` (ms-swift's environment switch; HF: the processor's
``use_audio_in_video`` / ``load_audio_from_video``): each video comes with its audio track, and
the video renders as ``<|vision_bos|><|audio_bos|>`` + the video's and the track's tokens
interleaved in time chunks (``position_id_per_seconds * seconds_per_chunk`` position values
each, video first) + ``<|audio_eos|><|vision_eos|>``. The tracks are given in the row's
``audios`` (mvlm does not decode audio out of video files): ``audios`` lists the audio of every
``<audio>`` tag and of every ``<video>`` tag, in the order the tags appear (HF's
``audio_from_video_indices`` order). A row whose ``audios`` do not number its ``<audio>`` plus
``<video>`` tags is refused, naming the switch.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from mvlm.data.errors import BadSampleError
from mvlm.data.formats import Sample, use_audio_in_video_from_env
from mvlm.data.media import MediaConfig, load_audio
from mvlm.data.template import TemplateConfig, _Prepared
from mvlm.models.qwen2_5_omni.positions import interleave_audio_in_video, omni_rope_index
from mvlm.models.qwen2_5_omni.tower import audio_output_lengths
from mvlm.models.qwen2_vl.template import Qwen2VLTemplate

AUDIO_PLACEHOLDER = "<|audio_bos|><|AUDIO|><|audio_eos|>"


class Qwen2_5OmniTemplate(Qwen2VLTemplate):
    """Qwen2.5-Omni thinker: images/videos as Qwen2.5-VL under Omni's token names, plus audio."""

    family = "qwen2_5_omni"
    uses_second_per_grid = True
    image_placeholder = "<|vision_bos|><|IMAGE|><|vision_eos|>"
    video_placeholder = "<|vision_bos|><|VIDEO|><|vision_eos|>"

    def __init__(self, tokenizer: Any, processor: Any = None, model_config: Any = None,
                 cfg: TemplateConfig | None = None, media: MediaConfig | None = None):
        super().__init__(tokenizer, processor, model_config, cfg, media)
        ids = tokenizer.convert_tokens_to_ids
        self.image_token_id = ids("<|IMAGE|>")
        self.video_token_id = ids("<|VIDEO|>")
        self.audio_token_id = ids("<|AUDIO|>")
        self.vision_start_id = ids("<|vision_bos|>")
        self.vision_end_id = ids("<|vision_eos|>")
        self.audio_start_id = ids("<|audio_bos|>")
        self.audio_end_id = ids("<|audio_eos|>")
        self.tokens_per_second = getattr(model_config, "position_id_per_seconds", 25)
        self.seconds_per_chunk = getattr(model_config, "seconds_per_chunk", 2)
        self.use_audio_in_video = use_audio_in_video_from_env()
        if self.use_audio_in_video:
            self.video_placeholder = ("<|vision_bos|><|audio_bos|><|VIDEO|><|audio_eos|>"
                                      "<|vision_eos|>")
        self.feature_extractor = getattr(processor, "feature_extractor", None)
        if self.feature_extractor is None:
            raise ValueError("qwen2_5_omni needs the checkpoint's audio feature extractor "
                             "(preprocessor_config.json / processor_config.json in the model dir)")
        self.sampling_rate = int(self.feature_extractor.sampling_rate)
        if self.media.sampling_rate != self.sampling_rate:
            raise ValueError(f"SAMPLING_RATE={self.media.sampling_rate} but the checkpoint's "
                             f"feature extractor takes {self.sampling_rate} Hz audio: unset "
                             f"SAMPLING_RATE or set it to {self.sampling_rate}")

    def _expand_tags(self, content: str) -> str:
        return super()._expand_tags(content).replace("<audio>", AUDIO_PLACEHOLDER)

    def prepare(self, sample: Sample, base_dir: str | None,
                with_pixels: bool = True) -> _Prepared:
        visual = Sample(sample.messages, sample.images, sample.videos, [], sample.task,
                        sample.rejected_messages, sample.extra)
        p = super().prepare(visual, base_dir, with_pixels)
        p.audios = [load_audio(r, self.sampling_rate, base_dir) for r in sample.audios]
        return p

    def process_vision(self, prepared: list[_Prepared]) -> list[dict]:
        out = super().process_vision(prepared)
        audios = [(j, a) for j, p in enumerate(prepared) for a in getattr(p, "audios", [])]
        if not audios:
            return out
        try:
            r = self.feature_extractor([a for _, a in audios], sampling_rate=self.sampling_rate,
                                       return_attention_mask=True, padding="max_length",
                                       return_tensors="pt")
        except (ValueError, RuntimeError) as e:
            raise BadSampleError("corrupt_media", f"audio feature extractor failed: {e}") from e
        for j in range(len(prepared)):
            sel = [k for k, (jj, _) in enumerate(audios) if jj == j]
            if sel:
                out[j]["input_features"] = r["input_features"][sel]
                out[j]["feature_attention_mask"] = r["attention_mask"][sel].long()
        return out

    def _audio_counts(self, vision: dict) -> list[int]:
        mask = vision.get("feature_attention_mask")
        return [] if mask is None else audio_output_lengths(mask.sum(-1)).tolist()

    def expand_vision(self, ids, train, vision):
        """Repeat each single pad (image, video, audio) to its token count; no loss there."""
        if self.use_audio_in_video and vision.get("video_grid_thw") is not None:
            return self._expand_audio_in_video(ids, train, vision)
        counts = {self.image_token_id: self._counts(vision.get("image_grid_thw")),
                  self.video_token_id: self._counts(vision.get("video_grid_thw")),
                  self.audio_token_id: self._audio_counts(vision)}
        found = {tok: int((ids == tok).sum()) for tok in counts}
        if any(found[tok] != len(c) for tok, c in counts.items()):
            raise BadSampleError(
                "media_count_mismatch",
                f"{found[self.image_token_id]} image / {found[self.video_token_id]} video / "
                f"{found[self.audio_token_id]} audio placeholders after rendering, but "
                f"{len(counts[self.image_token_id])} images / {len(counts[self.video_token_id])}"
                f" videos / {len(counts[self.audio_token_id])} audios (a literal <|IMAGE|>, "
                "<|VIDEO|> or <|AUDIO|> in the text, or a tag count that differs from the row's "
                "media lists?)")
        if not any(counts.values()):
            return ids, train, vision
        reps = np.ones(len(ids), dtype=np.int64)
        pad = np.zeros(len(ids), dtype=bool)
        for tok, c in counts.items():
            where = ids == tok
            reps[np.flatnonzero(where)] = c
            pad |= where
        return np.repeat(ids, reps), np.repeat(train & ~pad, reps), vision

    def _video_runs(self, vision: dict, v: int, audio_len: int) -> list[tuple[str, int]]:
        """The interleaved (kind, count) runs of video ``v`` with an audio track of
        ``audio_len`` tokens (the chunking of ``positions.py``)."""
        import torch

        t, h, w = (int(x) for x in vision["video_grid_thw"][v])
        lh, lw = h // self.merge, w // self.merge
        sec = torch.as_tensor(vision["second_per_grid_ts"][v]).float()
        t_idx = (torch.arange(t) * sec * self.tokens_per_second).long()
        video_pos = t_idx.view(-1, 1, 1).expand(t, lh, lw).flatten().view(1, -1).expand(3, -1)
        runs, _ = interleave_audio_in_video(video_pos, audio_len, 0,
                                            int(self.tokens_per_second * self.seconds_per_chunk))
        return runs

    def _expand_audio_in_video(self, ids, train, vision):
        """USE_AUDIO_IN_VIDEO: images and standalone audios as usual; each video pad becomes its
        frames' and its track's tokens interleaved by time chunk. ``audios`` are consumed in tag
        order, a video taking the next one as its track."""
        img = self._counts(vision.get("image_grid_thw"))
        vid = self._counts(vision.get("video_grid_thw"))
        aud = self._audio_counts(vision)
        n_img = int((ids == self.image_token_id).sum())
        n_vid = int((ids == self.video_token_id).sum())
        n_aud = int((ids == self.audio_token_id).sum())
        if n_img != len(img) or n_vid != len(vid) or n_aud + n_vid != len(aud):
            raise BadSampleError(
                "media_count_mismatch",
                f"USE_AUDIO_IN_VIDEO=true: {n_img} image / {n_vid} video / {n_aud} audio tags but "
                f"{len(img)} images / {len(vid)} videos / {len(aud)} audios; each video needs its "
                "audio track in `audios` (one per <audio> and per <video> tag, in tag order), or "
                "unset USE_AUDIO_IN_VIDEO")
        out_ids, out_train = [], []
        k_img = k_vid = k_aud = 0
        for tok, tr in zip(ids.tolist(), train.tolist()):
            if tok == self.image_token_id:
                out_ids += [tok] * img[k_img]
                out_train += [False] * img[k_img]
                k_img += 1
            elif tok == self.audio_token_id:
                out_ids += [tok] * aud[k_aud]
                out_train += [False] * aud[k_aud]
                k_aud += 1
            elif tok == self.video_token_id:
                for name, c in self._video_runs(vision, k_vid, aud[k_aud]):
                    out_ids += [self.video_token_id if name == "video" else
                                self.audio_token_id] * c
                    out_train += [False] * c
                k_vid += 1
                k_aud += 1
            else:
                out_ids.append(tok)
                out_train.append(tr)
        return (np.asarray(out_ids, dtype=ids.dtype), np.asarray(out_train, dtype=bool),
                vision)

    def _audio_in_video_blocks(self, ids, vision):
        """(start, end, kind, index) blocks under USE_AUDIO_IN_VIDEO: a video and its track
        share one block from ``<|vision_bos|>`` to ``<|vision_eos|>`` (kept or dropped
        together); images and standalone audios as usual."""
        blocks = [b for b in Qwen2VLTemplate.vision_blocks(self, ids, {
            "image_grid_thw": vision.get("image_grid_thw")}) if b[2] == "image"]
        n, i, k_vid, k_aud = len(ids), 0, 0, 0
        media = (self.video_token_id, self.audio_token_id)
        while i < n:
            if ids[i] == self.audio_start_id or (ids[i] == self.vision_start_id and i + 1 < n
                                                 and ids[i + 1] == self.audio_start_id):
                video = ids[i] == self.vision_start_id
                e = i + (2 if video else 1)
                while e < n and ids[e] in media:
                    e += 1
                e = min(n, e + (2 if video else 1))
                if video:
                    blocks.append((i, e, "video", k_vid))
                    k_vid += 1
                blocks.append((i, e, "audio", k_aud))
                k_aud += 1
                i = e
            else:
                i += 1
        return sorted(blocks)

    def vision_blocks(self, ids, vision):
        if self.use_audio_in_video and vision.get("video_grid_thw") is not None:
            return self._audio_in_video_blocks(ids, vision)
        blocks = super().vision_blocks(ids, vision)
        pads = np.flatnonzero(ids == self.audio_token_id)
        off = 0
        for k, c in enumerate(self._audio_counts(vision)):
            s, e = int(pads[off]), int(pads[off + c - 1]) + 1
            off += c
            if s > 0 and ids[s - 1] == self.audio_start_id:
                s -= 1
            if e < len(ids) and ids[e] == self.audio_end_id:
                e += 1
            blocks.append((s, e, "audio", k))
        return sorted(blocks)

    def drop_vision(self, vision, keep, blocks):
        vision = super().drop_vision(vision, keep, blocks)
        mask = vision.get("feature_attention_mask")
        if mask is None:
            return vision
        idx = [k for k in range(len(mask)) if ("audio", k) in keep]
        if len(idx) == len(mask):
            return vision
        if idx:
            vision["input_features"] = vision["input_features"][idx]
            vision["feature_attention_mask"] = mask[idx]
        else:
            vision.pop("input_features")
            vision.pop("feature_attention_mask")
        return vision

    def position_ids(self, ids, vision):
        return omni_rope_index(
            ids, image_token_id=self.image_token_id, video_token_id=self.video_token_id,
            spatial_merge_size=self.merge, position_id_per_seconds=self.tokens_per_second,
            image_grid_thw=vision.get("image_grid_thw"),
            video_grid_thw=vision.get("video_grid_thw"),
            second_per_grid_ts=vision.get("second_per_grid_ts"),
            audio_token_id=self.audio_token_id, audio_start_token_id=self.audio_start_id,
            seconds_per_chunk=self.seconds_per_chunk)[0]
