"""Templates: a validated row -> token ids, labels, vision tensors and mRoPE positions.

One :class:`Template` per family, found through :data:`TEMPLATES` (family -> class) by
:func:`get_template`. A later family plugs in by subclassing and registering itself.

How a sample is encoded (and why it equals the HF processor's output):

1. Render the conversation to one string. The *native* renderer writes ChatML directly (fast);
   the *jinja* renderer uses the checkpoint's own ``chat_template``. At construction the native
   render of a few probe conversations is compared with the checkpoint's chat template and, if
   they differ, the template switches to jinja with a warning -- so the checkpoint's template is
   always the truth and native is only a validated fast path. Each image is rendered as ONE
   ``<|image_pad|>`` (as HF chat templates do); the trained character spans (assistant contents
   plus their ``<|im_end|>``) are recorded while rendering.
2. Tokenize the string once with offsets (the HF processor tokenizes the same string after
   repeating the pad token, and added tokens are split out before BPE, so the ids agree).
3. Expand each single pad id to ``prod(grid_thw) / merge**2`` copies -- far cheaper than
   tokenizing thousands of pad tokens, which is most of the HF processor's text cost.
4. Pixels come from the checkpoint's own HF image/video processor, called once per batch of rows
   (it groups same-size images into one resize), so ``pixel_values``/``image_grid_thw`` are the
   processor's by construction.
5. Truncate to ``max_length`` (never through a vision block) and compute per-sample positions.

``encode`` returns *unshifted* labels (HF style, -100 = no loss); the collator shifts them.
"""
from __future__ import annotations

import copy
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from mvlm.data.errors import BadSampleError
from mvlm.data.flags import TRUNCATION_STRATEGIES  # one tuple: the flag's choices
from mvlm.data.formats import Sample, parse_row
from mvlm.data.media import (
    DALI_HINT,
    MediaConfig,
    dali_available,
    dali_decode_resize,
    load_image,
    load_video,
    probe_image,
    read_media_bytes,
    smart_resize,
)
from mvlm.data.mrope import get_rope_index, text_position_ids

logger = logging.getLogger(__name__)


def _raw_size(data: bytes) -> tuple[int, int]:
    """(height, width) as stored, before any EXIF rotation."""
    import io

    from PIL import Image
    with Image.open(io.BytesIO(data)) as im:
        return im.height, im.width
_TAG_RE = re.compile(r"(<image>|<video>|<audio>)")
# ms-swift's ignore_empty_think patterns that fit ChatML families: an empty think block, or a
# lone close tag when the prompt already opened the block; each only at a response's start.
_EMPTY_THINK_RE = re.compile(r"<think>\s*</think>\s*|</think>\s*")
_THINK_OPEN = "<think>"


class SkipSample(BadSampleError):
    """A row dropped on purpose (``--truncation_strategy delete``): skipped under any policy."""

    def __reduce__(self):
        return (SkipSample, (self.reason, self.detail, self.source, self.row))


@dataclass
class TemplateConfig:
    """Knobs of the text side (ms-swift flag names)."""

    max_length: int | None = None
    truncation_strategy: str = "delete"
    task: str = "sft"  # pt | sft | preference | rl
    system: str | None = None  # None: the family's default system prompt; "" for none
    template_backend: str = "native"  # native | jinja
    # ms-swift's --add_non_thinking_prefix: every assistant turn that does not open with a think
    # block gets the family's empty one, so a hybrid-thinking model learns "answer without
    # thinking" from data written without think blocks (ms-swift applies it to every turn under
    # loss_scale default, the only chat strategy mvlm has).
    add_non_thinking_prefix: bool = False
    # ms-swift's --loss_scale ignore_empty_think: an empty think block at the start of an
    # assistant turn carries no loss (the rest of the turn keeps it), so the model is not trained
    # to skip thinking -- only to answer after a skipped one.
    ignore_empty_think: bool = False

    def __post_init__(self):
        if self.truncation_strategy not in TRUNCATION_STRATEGIES:
            raise ValueError(f"--truncation_strategy must be one of {TRUNCATION_STRATEGIES}, "
                             f"got {self.truncation_strategy!r}")
        if self.template_backend not in ("native", "jinja"):
            raise ValueError("--template_backend must be native or jinja")
        if self.task not in ("sft", "preference"):
            for on, flag in ((self.add_non_thinking_prefix, "--add_non_thinking_prefix true"),
                             (self.ignore_empty_think, "--loss_scale ignore_empty_think")):
                if on:
                    raise ValueError(f"{flag} acts on chat-rendered assistant turns (task sft "
                                     f"or preference), not on task {self.task!r}: drop the flag")


@dataclass
class _Prepared:
    """A row after rendering and media loading, before tokenization and pixel processing."""

    text: str
    spans: list[tuple[int, int]]
    images: list[Any] = field(default_factory=list)  # PIL images (pixels wanted now) ...
    image_refs: list[Any] = field(default_factory=list)  # ... or storable refs (pixels later)
    image_grids: list[tuple[int, int, int]] = field(default_factory=list)
    videos: list[Any] = field(default_factory=list)
    extra: dict = field(default_factory=dict)


class Template:
    """Base ChatML template for Qwen-family tokenizers (text-only)."""

    family: ClassVar[str] = "chatml"
    default_system: ClassVar[str | None] = "You are a helpful assistant."
    im_start: ClassVar[str] = "<|im_start|>"
    im_end: ClassVar[str] = "<|im_end|>"
    image_placeholder: ClassVar[str] = "<|vision_start|><|image_pad|><|vision_end|>"
    video_placeholder: ClassVar[str] = "<|vision_start|><|video_pad|><|vision_end|>"
    is_multimodal: ClassVar[bool] = False
    # The empty think block of a hybrid-thinking family (what its chat template writes for
    # enable_thinking=false); "" = the family has no thinking switch.
    non_thinking_prefix: ClassVar[str] = ""

    def __init__(self, tokenizer: Any, processor: Any = None, model_config: Any = None,
                 cfg: TemplateConfig | None = None, media: MediaConfig | None = None):
        self.tokenizer = tokenizer
        self.processor = processor
        self.model_config = model_config
        self.cfg = cfg or TemplateConfig()
        self.media = media or MediaConfig.from_env()
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("mvlm templates need a fast (Rust) tokenizer for offset mapping; "
                             "save the tokenizer with tokenizer.json")
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
            else tokenizer.eos_token_id
        self.eos_token = tokenizer.eos_token
        self.backend = self.cfg.template_backend
        if self.cfg.add_non_thinking_prefix and not self.non_thinking_prefix:
            raise ValueError(f"--add_non_thinking_prefix true: the {self.family} family has no "
                             "thinking mode (no empty think block to add); pass false")
        if self.backend == "native" and getattr(tokenizer, "chat_template", None) \
                and self.cfg.task != "pt":
            self._check_native_against_jinja()

    # ------------------------------------------------------------------ rendering
    @property
    def system_prompt(self) -> str | None:
        if self.cfg.system is not None:
            return self.cfg.system or None
        return self.default_system

    def _expand_tags(self, content: str) -> str:
        return content.replace("<image>", self.image_placeholder).replace(
            "<video>", self.video_placeholder)

    def render_native(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """ChatML string and the character spans that carry loss (assistant turns)."""
        parts: list[str] = []
        spans: list[tuple[int, int]] = []
        n = 0

        def add(s: str, train: bool = False) -> None:
            nonlocal n
            if train and s:
                spans.append((n, n + len(s)))
            parts.append(s)
            n += len(s)

        if messages[0]["role"] != "system" and self.system_prompt:
            add(f"{self.im_start}system\n{self.system_prompt}{self.im_end}\n")
        for m in messages:
            train = m["role"] == "assistant"
            add(f"{self.im_start}{m['role']}\n")
            add(self._expand_tags(m["content"]) + self.im_end, train)
            add("\n")
        return "".join(parts), spans

    def _hf_messages(self, messages: list[dict]) -> list[dict]:
        """Tags -> HF content parts, so the checkpoint's chat template can render them."""
        out = []
        for m in messages:
            if not _TAG_RE.search(m["content"]):
                out.append({"role": m["role"], "content": m["content"]})
                continue
            content = []
            for piece in _TAG_RE.split(m["content"]):
                if piece in ("<image>", "<video>", "<audio>"):
                    content.append({"type": piece[1:-1]})
                elif piece:
                    content.append({"type": "text", "text": piece})
            out.append({"role": m["role"], "content": content})
        return out

    def _apply(self, messages: list[dict], gen: bool) -> str:
        obj = self.processor if self.processor is not None and getattr(
            self.processor, "chat_template", None) else self.tokenizer
        return obj.apply_chat_template(self._hf_messages(messages), tokenize=False,
                                       add_generation_prompt=gen)

    def render_jinja(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """Render with the checkpoint's chat template; loss spans from prefix renders."""
        if self.cfg.system and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.cfg.system}, *messages]
        full = self._apply(messages, gen=False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prefix = self._apply(messages[:i], gen=True)
            upto = self._apply(messages[:i + 1], gen=False).rstrip()
            if not (full.startswith(prefix) and full.startswith(upto)
                    and len(upto) >= len(prefix)):
                raise BadSampleError("template_not_prefix_stable",
                                     "the chat template renders earlier turns differently when "
                                     "later turns are added; use a ChatML-style template")
            spans.append((len(prefix), len(upto)))
        return full, spans

    def render_pretrain(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """Generative template: contents concatenated, no chat wrapping, loss on everything."""
        text = "".join(self._expand_tags(m["content"]) for m in messages)
        if self.eos_token:
            text += self.eos_token
        return text, [(0, len(text))]

    def add_think_prefix(self, messages: list[dict]) -> list[dict]:
        """A copy of ``messages`` whose assistant turns all open with a think block: the family's
        empty one is prepended where a turn starts with neither ``<think>`` nor that block."""
        pre = self.non_thinking_prefix
        return [{**m, "content": pre + m["content"]}
                if m["role"] == "assistant" and not m["content"].startswith((_THINK_OPEN, pre))
                else m for m in messages]

    @staticmethod
    def drop_empty_think(text: str, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Loss spans without the empty think block that opens a response (ignore_empty_think).

        Each span starts where an assistant turn's content starts (both renderers), so the
        pattern is matched there only; a think block with content keeps its loss."""
        out = []
        for s, e in spans:
            m = _EMPTY_THINK_RE.match(text, s, e)
            out.append((m.end(), e) if m else (s, e))
        return [(s, e) for s, e in out if e > s]

    def render(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        if self.cfg.task == "pt":
            return self.render_pretrain(messages)
        if self.cfg.task == "rl":  # a prompt for generation: no loss, ends ready for an answer
            if self.backend == "jinja":
                if self.cfg.system and messages[0]["role"] != "system":
                    messages = [{"role": "system", "content": self.cfg.system}, *messages]
                return self._apply(messages, gen=True), []
            return self.render_native(messages)[0] + f"{self.im_start}assistant\n", []
        if self.cfg.add_non_thinking_prefix:
            messages = self.add_think_prefix(messages)
        text, spans = (self.render_jinja if self.backend == "jinja" else
                       self.render_native)(messages)
        if self.cfg.ignore_empty_think:
            spans = self.drop_empty_think(text, spans)
        return text, spans

    def _check_native_against_jinja(self) -> None:
        img = "<image>" if self.is_multimodal else ""
        probes = [
            [{"role": "user", "content": f"{img}Hi there"},
             {"role": "assistant", "content": "Ok."}],
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"},
             {"role": "assistant", "content": "A1"}, {"role": "user", "content": f"Q2{img}"},
             {"role": "assistant", "content": "A2"}],
        ]
        for p in probes:
            try:
                ref = self._apply(p, gen=False)
            except Exception as e:  # noqa: BLE001 - any template failure means: trust native
                logger.warning("chat template of the checkpoint failed on a probe (%s); "
                               "using the native %s template", e, self.family)
                return
            if self.render_native(p)[0] != ref:
                logger.warning("the checkpoint's chat template differs from the native %s "
                               "template; rendering with the checkpoint's template (slower)",
                               self.family)
                self.backend = "jinja"
                return

    # ------------------------------------------------------------------ encoding
    def prepare(self, sample: Sample, base_dir: str | None,
                with_pixels: bool = True) -> _Prepared:
        """Render + load media for one parsed sample (errors are BadSampleError)."""
        if sample.audios:
            raise BadSampleError("unsupported_media", f"{self.family} takes no audio")
        if (sample.images or sample.videos) and not self.is_multimodal:
            raise BadSampleError("unsupported_media", f"{self.family} is text-only but the row "
                                 "has images/videos")
        text, spans = self.render(sample.messages)
        return _Prepared(text, spans, extra=dict(sample.extra))

    def encode(self, row: dict | Sample, base_dir: str | None = None,
               with_pixels: bool = True) -> dict[str, Any]:
        """Encode one row; raises BadSampleError (or SkipSample) with the reason.

        ``with_pixels=False`` leaves images undecoded: the result holds ``image_grid_thw`` and
        ``image_refs`` (path or bytes per image) and :meth:`load_pixels` adds ``pixel_values``
        later -- how datasets are pre-encoded and cached.
        """
        out = self.encode_batch([row], base_dir, with_pixels)[0]
        if isinstance(out, BaseException):
            raise out
        return out

    def encode_batch(self, rows: list[dict | Sample], base_dir: str | None = None,
                     with_pixels: bool = True) -> list[dict | BadSampleError]:
        """Encode several rows at once (one tokenizer call, one image-processor call).

        Returns one entry per row: the encoded dict, or the BadSampleError it raised. Any other
        exception inside a row is converted into BadSampleError("internal_error") naming its
        type, so a loader worker never dies without saying which row did it.

        Preference rows encode both conversations: the chosen one as usual, the rejected one
        under ``rejected_input_ids`` / ``rejected_labels`` / ``rejected_position_ids`` /
        ``rejected_length`` (the media are shared, so vision tensors appear once).
        """
        units: list[Sample | BadSampleError] = []
        owner: list[int] = []  # row index of each unit; a preference row owns two units
        for r, row in enumerate(rows):
            try:
                sample = row if isinstance(row, Sample) else parse_row(row, self.cfg.task)
            except BadSampleError as e:
                sample = e
            except Exception as e:  # noqa: BLE001 - turned into a reasoned, located error
                sample = BadSampleError("internal_error", f"{type(e).__name__}: {e}")
            units.append(sample)
            owner.append(r)
            if isinstance(sample, Sample) and sample.rejected_messages is not None:
                units.append(Sample(sample.rejected_messages, sample.images, sample.videos,
                                    sample.audios, sample.task))
                owner.append(r)
        out = self._encode_units(units, base_dir, with_pixels)
        results: list[Any] = [None] * len(rows)
        for u, r in enumerate(owner):
            if results[r] is None:
                results[r] = out[u]
            elif isinstance(results[r], dict):  # second unit of a preference row
                if isinstance(out[u], BaseException):
                    results[r] = out[u]
                else:
                    for k in ("input_ids", "labels", "position_ids", "length"):
                        results[r][f"rejected_{k}"] = out[u][k]
        return results

    def _encode_units(self, units: list[Any], base_dir: str | None,
                      with_pixels: bool) -> list[dict | BadSampleError]:
        prepared: list[_Prepared | BadSampleError] = []
        for sample in units:
            if isinstance(sample, BadSampleError):
                prepared.append(sample)
                continue
            try:
                prepared.append(self.prepare(sample, base_dir, with_pixels))
            except BadSampleError as e:
                prepared.append(e)
            except Exception as e:  # noqa: BLE001 - turned into a reasoned, located error
                prepared.append(BadSampleError("internal_error", f"{type(e).__name__}: {e}"))
        ok = [i for i, p in enumerate(prepared) if isinstance(p, _Prepared)]
        results: list[Any] = list(prepared)
        if not ok:
            return results
        texts = [prepared[i].text for i in ok]
        enc = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True,
                             return_attention_mask=False)
        try:
            vision = self.process_vision([prepared[i] for i in ok])
        except BadSampleError:
            vision = None  # one bad image: redo row by row so only that row fails
        for j, i in enumerate(ok):
            try:
                v = vision[j] if vision is not None else self.process_vision([prepared[i]])[0]
                results[i] = self.finish(prepared[i], enc["input_ids"][j],
                                         enc["offset_mapping"][j], v)
            except BadSampleError as e:
                results[i] = e
            except Exception as e:  # noqa: BLE001
                results[i] = BadSampleError("internal_error", f"{type(e).__name__}: {e}")
        return results

    def process_vision(self, prepared: list[_Prepared]) -> list[dict]:
        return [{} for _ in prepared]

    def load_pixels(self, sample: dict[str, Any]) -> dict[str, Any]:
        """Add pixel tensors to a sample encoded with ``with_pixels=False`` (no-op otherwise)."""
        return sample

    def finish(self, p: _Prepared, ids: list[int], offsets: list[tuple[int, int]],
               vision: dict) -> dict[str, Any]:
        ids_arr = np.asarray(ids, dtype=np.int64)
        starts = np.asarray([o[0] for o in offsets], dtype=np.int64)
        train = np.zeros(len(ids), dtype=bool)
        for s, e in p.spans:
            train |= (starts >= s) & (starts < e)
        ids_arr, train, vision = self.expand_vision(ids_arr, train, vision)
        ids_arr, train, vision = self.truncate(ids_arr, train, vision)
        if self.cfg.task in ("sft", "pt", "preference") and not train.any():
            raise BadSampleError("no_trainable_tokens",
                                 "no token carries loss after truncation/masking")
        labels = np.where(train, ids_arr, -100)
        out = {"input_ids": torch.from_numpy(ids_arr), "labels": torch.from_numpy(labels),
               "position_ids": self.position_ids(ids_arr, vision), "length": len(ids_arr)}
        out.update({k: v for k, v in vision.items() if not k.startswith("_")})
        if p.extra:
            out["extra"] = p.extra
        return out

    def expand_vision(self, ids, train, vision):
        return ids, train, vision

    def vision_blocks(self, ids: np.ndarray, vision: dict) -> list[tuple[int, int, str, int]]:
        return []

    def truncate(self, ids: np.ndarray, train: np.ndarray, vision: dict):
        """Apply ``max_length`` with the truncation strategy; vision blocks are never split."""
        limit = self.cfg.max_length
        n = len(ids)
        if limit is None or n <= limit:
            return ids, train, vision
        strat = self.cfg.truncation_strategy
        if strat == "delete":
            raise SkipSample("too_long", f"{n} tokens > max_length {limit} "
                             "(--truncation_strategy delete)")
        if strat == "error":
            raise BadSampleError("too_long", f"{n} tokens > max_length {limit}; raise "
                                 "--max_length or pick --truncation_strategy left|right|delete")
        blocks = self.vision_blocks(ids, vision)
        if strat == "right":
            lo, hi = 0, limit
            for s, e, _, _ in blocks:
                if s < hi < e:  # would cut an image: end the sample before the block
                    hi = s
        else:
            lo, hi = n - limit, n
            for s, e, _, _ in blocks:
                if s < lo < e:  # would cut an image: start after the block
                    lo = e
        if hi <= lo:
            raise BadSampleError("too_long", f"{n} tokens > max_length {limit} and the only "
                                 "way to truncate would cut through an image")
        keep = {(kind, idx) for s, e, kind, idx in blocks if s >= lo and e <= hi}
        vision = self.drop_vision(vision, keep, blocks)
        return ids[lo:hi], train[lo:hi], vision

    def drop_vision(self, vision, keep, blocks):
        return vision

    def position_ids(self, ids: np.ndarray, vision: dict) -> torch.Tensor:
        return text_position_ids(len(ids))


class Qwen2Template(Template):
    family = "qwen2"


class Qwen3MoeTemplate(Template):
    family = "qwen3_moe"
    default_system = None  # Qwen3 adds no default system prompt
    non_thinking_prefix = "<think>\n\n</think>\n\n"  # Qwen3 hybrid thinking (ms-swift's qwen3)


class Qwen2VLTemplate(Template):
    """Qwen2-VL: images/videos as <|vision_start|><|image_pad|>*N<|vision_end|>, 3-D mRoPE."""

    family = "qwen2_vl"
    is_multimodal = True
    uses_second_per_grid = False

    def __init__(self, tokenizer: Any, processor: Any = None, model_config: Any = None,
                 cfg: TemplateConfig | None = None, media: MediaConfig | None = None):
        if processor is None or getattr(processor, "image_processor", None) is None:
            raise ValueError(f"{self.family} needs the checkpoint's processor "
                             "(processor_config.json / preprocessor_config.json in the model dir)")
        super().__init__(tokenizer, processor, model_config, cfg, media)
        ip = processor.image_processor
        self.image_processor = ip
        self.video_processor = getattr(processor, "video_processor", None)
        self.merge = int(ip.merge_size)
        self.patch = int(ip.patch_size)
        self.temporal_patch = int(ip.temporal_patch_size)
        self.image_token_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.video_token_id = tokenizer.convert_tokens_to_ids("<|video_pad|>")
        self.vision_start_id = tokenizer.convert_tokens_to_ids("<|vision_start|>")
        self.vision_end_id = tokenizer.convert_tokens_to_ids("<|vision_end|>")
        vc = getattr(model_config, "vision_config", None)
        self.tokens_per_second = getattr(vc, "tokens_per_second", None) \
            if self.uses_second_per_grid else None
        if self.uses_second_per_grid and self.tokens_per_second is None:
            self.tokens_per_second = 2
        self.factor = self.patch * self.merge
        size = ip.size
        lo, hi = self.media.image_pixel_range(
            self.factor, int(size.get("shortest_edge") or 56 * 56),
            int(size.get("longest_edge") or 28 * 28 * 1280))
        self.pixel_range = (lo, hi)
        self.dali_device: int | None = None
        if self.media.image_backend == "dali":
            if not dali_available():
                raise ImportError(DALI_HINT)
            if torch.cuda.is_available():
                self.dali_device = torch.cuda.current_device()
        self.image_kwargs = {}
        if (lo, hi) != (size.get("shortest_edge"), size.get("longest_edge")):
            self.image_kwargs["size"] = {"shortest_edge": lo, "longest_edge": hi}
        self.video_kwargs: dict[str, Any] = {"do_sample_frames": False}
        if self.video_processor is not None:
            vs = self.video_processor.size
            vlo, vhi = self.media.video_pixel_range(
                self.factor, int(vs.get("shortest_edge") or 128 * 28 * 28),
                int(vs.get("longest_edge") or 768 * 28 * 28))
            if (vlo, vhi) != (vs.get("shortest_edge"), vs.get("longest_edge")):
                self.video_kwargs["size"] = {"shortest_edge": vlo, "longest_edge": vhi}

    def image_grid(self, height: int, width: int) -> tuple[int, int, int]:
        """(t, h, w) patch grid of an image -- the processor's smart resize, without pixels."""
        h, w = smart_resize(height, width, self.factor, *self.pixel_range)
        return (1, h // self.patch, w // self.patch)

    def prepare(self, sample: Sample, base_dir: str | None,
                with_pixels: bool = True) -> _Prepared:
        p = super().prepare(sample, base_dir, with_pixels)
        root = self.media.root_image_dir
        if with_pixels:
            p.images = [load_image(r, base_dir, root) for r in sample.images]
            sizes = [(im.height, im.width) for im in p.images]
        else:
            infos = [probe_image(r, base_dir, root) for r in sample.images]
            p.image_refs = [i.ref() for i in infos]
            sizes = [(i.height, i.width) for i in infos]
        p.image_grids = [self.image_grid(h, w) for h, w in sizes]  # validates the geometry
        p.videos = [load_video(r, self.media, base_dir) for r in sample.videos]
        return p

    def process_vision(self, prepared: list[_Prepared]) -> list[dict]:
        out: list[dict] = [{} for _ in prepared]
        for j, p in enumerate(prepared):
            if p.image_refs:  # pixels later (load_pixels); the grid is known from the size
                out[j]["image_grid_thw"] = torch.tensor(p.image_grids, dtype=torch.long)
                out[j]["image_refs"] = list(p.image_refs)
        imgs = [im for p in prepared for im in p.images]
        if imgs:
            try:
                r = self.image_processor(images=imgs, return_tensors="pt", **self.image_kwargs)
            except (ValueError, OSError, RuntimeError) as e:
                raise BadSampleError("corrupt_media", f"image processor failed: {e}") from e
            expect = [g for p in prepared for g in p.image_grids]
            if r["image_grid_thw"].tolist() != [list(g) for g in expect]:
                raise RuntimeError(f"image processor grids {r['image_grid_thw'].tolist()} differ "
                                   f"from the predicted {expect}: smart_resize out of sync")
            sizes = (r["image_grid_thw"].prod(-1)).tolist()
            pv = torch.split(r["pixel_values"], sizes)
            k = 0
            for j, p in enumerate(prepared):
                if p.images:
                    m = len(p.images)
                    out[j]["pixel_values"] = torch.cat(pv[k:k + m])
                    out[j]["image_grid_thw"] = r["image_grid_thw"][k:k + m]
                    k += m
        vids = [(j, v) for j, p in enumerate(prepared) for v in p.videos]
        if vids:
            if self.video_processor is None:
                raise BadSampleError("unsupported_media", "the checkpoint has no video processor")
            try:
                r = self.video_processor(videos=[torch.from_numpy(v.frames) for _, v in vids],
                                         return_tensors="pt", **self.video_kwargs)
            except (ValueError, OSError, RuntimeError) as e:
                raise BadSampleError("corrupt_media", f"video processor failed: {e}") from e
            sizes = r["video_grid_thw"].prod(-1).tolist()
            pv = torch.split(r["pixel_values_videos"], sizes)
            for j in range(len(prepared)):
                sel = [k for k, (jj, _) in enumerate(vids) if jj == j]
                if sel:
                    out[j]["pixel_values_videos"] = torch.cat([pv[k] for k in sel])
                    out[j]["video_grid_thw"] = r["video_grid_thw"][sel]
                    out[j]["second_per_grid_ts"] = torch.tensor(
                        [self.temporal_patch / vids[k][1].sample_fps for k in sel],
                        dtype=torch.float32)
        return out

    def load_pixels(self, sample: dict[str, Any]) -> dict[str, Any]:
        """Decode ``image_refs`` and run the image processor (in loader workers)."""
        refs = sample.pop("image_refs", None)
        if not refs:
            return sample
        kwargs = dict(self.image_kwargs)
        if self.media.image_backend == "dali":
            imgs = self._dali_images(refs, torch.as_tensor(sample["image_grid_thw"]))
            kwargs["do_resize"] = False  # DALI already resized to the grid's pixel size
        else:
            imgs = [load_image(r) for r in refs]
        try:
            r = self.image_processor(images=imgs, return_tensors="pt", **kwargs)
        except (ValueError, OSError, RuntimeError) as e:
            raise BadSampleError("corrupt_media", f"image processor failed: {e}") from e
        if not torch.equal(r["image_grid_thw"], torch.as_tensor(sample["image_grid_thw"])):
            raise BadSampleError("media_changed", "an image's size differs from when the "
                                 "dataset was encoded; re-run mvlm encode")
        sample["pixel_values"] = r["pixel_values"]
        return sample

    def _dali_images(self, refs: list[Any], grid: torch.Tensor) -> list[Any]:
        """Decode + resize with DALI; images with an EXIF rotation go through PIL instead."""
        out: list[Any] = [None] * len(refs)
        enc, sizes, where = [], [], []
        for k, ref in enumerate(refs):
            src = read_media_bytes(ref)
            if isinstance(src, str):
                with open(src, "rb") as f:
                    src = f.read()
            data = src
            size = (int(grid[k, 1]) * self.patch, int(grid[k, 2]) * self.patch)
            info = probe_image(data)
            if (info.height, info.width) != _raw_size(data):  # rotated by EXIF: PIL path
                img = load_image(data).resize(size[::-1], resample=3)
                out[k] = np.asarray(img)
                continue
            enc.append(data)
            sizes.append(size)
            where.append(k)
        if enc:
            for k, arr in zip(where, dali_decode_resize(enc, sizes, self.dali_device)):
                out[k] = arr
        return [torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1) for a in out]

    def _counts(self, grid: torch.Tensor | None) -> list[int]:
        if grid is None:
            return []
        return (grid.prod(-1) // (self.merge ** 2)).tolist()

    def expand_vision(self, ids, train, vision):
        """Repeat each single pad id to the grid's token count (labels stay -100 there)."""
        img_counts = self._counts(vision.get("image_grid_thw"))
        vid_counts = self._counts(vision.get("video_grid_thw"))
        is_img = ids == self.image_token_id
        is_vid = ids == self.video_token_id
        if int(is_img.sum()) != len(img_counts) or int(is_vid.sum()) != len(vid_counts):
            raise BadSampleError("media_count_mismatch",
                                 f"{int(is_img.sum())} image / {int(is_vid.sum())} video "
                                 f"placeholders after rendering, but {len(img_counts)} images / "
                                 f"{len(vid_counts)} videos (is a literal <|image_pad|> in text?)")
        if not img_counts and not vid_counts:
            return ids, train, vision
        reps = np.ones(len(ids), dtype=np.int64)
        reps[np.flatnonzero(is_img)] = img_counts
        reps[np.flatnonzero(is_vid)] = vid_counts
        ids = np.repeat(ids, reps)
        train = np.repeat(train & ~is_img & ~is_vid, reps)
        return ids, train, vision

    def vision_blocks(self, ids, vision):
        """(start, end, kind, index) of each image/video block incl. its start/end markers."""
        blocks = []
        n = len(ids)
        for kind, tok, key in (("image", self.image_token_id, "image_grid_thw"),
                               ("video", self.video_token_id, "video_grid_thw")):
            pads = np.flatnonzero(ids == tok)
            off = 0
            for k, c in enumerate(self._counts(vision.get(key))):
                s, e = int(pads[off]), int(pads[off + c - 1]) + 1
                off += c
                if s > 0 and ids[s - 1] == self.vision_start_id:
                    s -= 1
                if e < n and ids[e] == self.vision_end_id:
                    e += 1
                blocks.append((s, e, kind, k))
        return sorted(blocks)

    def drop_vision(self, vision, keep, blocks):
        vision = dict(vision)
        for kind, pv_key, grid_key in (("image", "pixel_values", "image_grid_thw"),
                                       ("video", "pixel_values_videos", "video_grid_thw")):
            grid = vision.get(grid_key)
            if grid is None:
                continue
            idx = [k for k in range(len(grid)) if (kind, k) in keep]
            if len(idx) == len(grid):
                continue
            if kind == "image" and "image_refs" in vision:
                vision["image_refs"] = [vision["image_refs"][k] for k in idx]
            if pv_key in vision:
                chunks = torch.split(vision[pv_key], grid.prod(-1).tolist())
            if idx:
                if pv_key in vision:
                    vision[pv_key] = torch.cat([chunks[k] for k in idx])
                vision[grid_key] = grid[idx]
                if kind == "video" and "second_per_grid_ts" in vision:
                    vision["second_per_grid_ts"] = vision["second_per_grid_ts"][idx]
            else:
                vision.pop(pv_key, None)
                vision.pop(grid_key)
                if kind == "image":
                    vision.pop("image_refs", None)
                if kind == "video":
                    vision.pop("second_per_grid_ts", None)
        return vision

    def position_ids(self, ids, vision):
        return get_rope_index(
            ids, image_token_id=self.image_token_id, video_token_id=self.video_token_id,
            spatial_merge_size=self.merge, image_grid_thw=vision.get("image_grid_thw"),
            video_grid_thw=vision.get("video_grid_thw"),
            second_per_grid_ts=vision.get("second_per_grid_ts"),
            tokens_per_second=self.tokens_per_second)


class Qwen2_5VLTemplate(Qwen2VLTemplate):
    """Qwen2.5-VL: as Qwen2-VL, plus video temporal positions scaled by second_per_grid_ts."""

    family = "qwen2_5_vl"
    uses_second_per_grid = True


TEMPLATES: dict[str, type[Template]] = {
    "qwen2": Qwen2Template,
    "qwen3_moe": Qwen3MoeTemplate,
    "qwen2_vl": Qwen2VLTemplate,
    "qwen2_5_vl": Qwen2_5VLTemplate,
}


def register_template(family: str, cls: type[Template]) -> None:
    """Plug a new family in (its Template subclass)."""
    TEMPLATES[family] = cls


def load_hf_parts(model_dir: str | os.PathLike) -> tuple[Any, Any, Any]:
    """(tokenizer, processor or None, config) from an HF checkpoint directory."""
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer

    config = AutoConfig.from_pretrained(model_dir)
    processor = None
    if config.model_type in ("qwen2_vl", "qwen2_5_vl") or hasattr(config, "vision_config"):
        processor = AutoProcessor.from_pretrained(model_dir)
        tokenizer = processor.tokenizer
    else:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return tokenizer, processor, config


def get_template(model_dir: str | os.PathLike | None = None, *, family: str | None = None,
                 tokenizer: Any = None, processor: Any = None, config: Any = None,
                 cfg: TemplateConfig | None = None,
                 media: MediaConfig | None = None) -> Template:
    """Build the template for a checkpoint dir (or for given HF parts)."""
    if model_dir is not None:
        tokenizer, processor, config = load_hf_parts(model_dir)
    family = family or getattr(config, "model_type", None)
    if family not in TEMPLATES:
        raise ValueError(f"no template for model_type {family!r}; known: {sorted(TEMPLATES)}")
    if tokenizer is None:
        tokenizer = processor.tokenizer
    return TEMPLATES[family](tokenizer, processor, config, copy.copy(cfg), media)
