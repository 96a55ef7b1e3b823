"""Templates: a validated row -> token ids, labels, vision tensors and mRoPE positions.

The generic :class:`Template` (ChatML rendering, tokenization with offsets, truncation, labels)
lives here; each family's subclass lives in its folder (``mvlm/models/<name>/template.py``) and
is found through the model registry by :func:`get_template`.

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
    MediaConfig,
)
from mvlm.data.mrope import text_position_ids

logger = logging.getLogger(__name__)


def raw_image_size(data: bytes) -> tuple[int, int]:
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


def load_hf_parts(model_dir: str | os.PathLike) -> tuple[Any, Any, Any]:
    """(tokenizer, processor or None, config) from an HF checkpoint directory."""
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer

    config = AutoConfig.from_pretrained(model_dir)
    processor = None
    if _family(config.model_type).is_vlm or hasattr(config, "vision_config"):
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
    cls = _family(family).template_class()
    if tokenizer is None:
        tokenizer = processor.tokenizer
    return cls(tokenizer, processor, config, copy.copy(cfg), media)


def _family(model_type: str | None):
    """The registry entry of ``model_type`` (the error lists the supported ones)."""
    from mvlm.models.registry import get_family

    return get_family(str(model_type))
