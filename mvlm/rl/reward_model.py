"""Loading a reward model exported by ``mvlm rlhf --rlhf_type rm`` with transformers.

:func:`load_reward_model` reads the directory's ``reward_model.json``
(:mod:`mvlm.train.reward_export`) and returns a :class:`RewardModel`: a callable that scores
texts (``rm(["full conversation text", ...]) -> tensor [n]``) or, through
:meth:`RewardModel.score_ids`, already-tokenised sequences with their media (what a caller that
holds token ids -- GRPO's ``--reward_model`` -- passes). One sequence per forward, so no padding
convention is involved: the reward is the value at the sequence's last token.

* ``sequence_classification``: ``AutoModelForSequenceClassification`` (``logits[:, 0]``);
* ``value_head``: the base model (``AutoModelForImageTextToText`` for a VLM, else
  ``AutoModelForCausalLM``) run as ``model.model(...)``; reward = ``score.weight @
  last_hidden_state[:, -1]``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

META_FILE = "reward_model.json"


class RewardModel:
    """A scalar reward per sequence from an exported reward-model directory."""

    def __init__(self, path: Path, kind: str, model: Any, tokenizer: Any,
                 head: torch.Tensor | None = None, processor: Any = None):
        self.path, self.kind, self.model, self.tokenizer = path, kind, model, tokenizer
        self.head, self.processor = head, processor

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def score_ids(self, input_ids: torch.Tensor, **media: Any) -> torch.Tensor:
        """Reward of one tokenised sequence (``input_ids`` [s] or [1, s]; media as the HF model
        takes them, e.g. ``pixel_values``, ``image_grid_thw``) as a 0-dim fp32 tensor."""
        ids = torch.as_tensor(input_ids).reshape(1, -1).to(self.device)
        media = {k: (v.to(self.device) if torch.is_tensor(v) else v)
                 for k, v in media.items() if v is not None}
        if "pixel_values" in media and torch.is_floating_point(media["pixel_values"]):
            media["pixel_values"] = media["pixel_values"].to(self.model.dtype)
        if ("image_grid_thw" in media or "video_grid_thw" in media) and \
                "mm_token_type_ids" not in media:
            media["mm_token_type_ids"] = self._token_types(ids)
        if self.kind == "sequence_classification":
            return self.model(input_ids=ids, **media).logits[0, 0].float()
        hidden = self.model.model(input_ids=ids, **media).last_hidden_state[0, -1]
        return (hidden.float() @ self.head.to(self.device).float()[0])

    def _token_types(self, ids: torch.Tensor) -> torch.Tensor:
        """Qwen-VL's ``mm_token_type_ids`` (1 image, 2 video placeholders, 0 text): what its
        processor returns and its M-RoPE positions need."""
        cfg = self.model.config
        out = torch.zeros_like(ids, dtype=torch.int)
        for tok, kind in (("image_token_id", 1), ("video_token_id", 2)):
            t = getattr(cfg, tok, None)
            if t is not None:
                out = torch.where(ids == t, kind, out)
        return out

    def __call__(self, texts: list[str] | str, images: list[Any] | None = None) -> torch.Tensor:
        """Rewards [n] of rendered texts (chat template already applied); ``images``: one list
        of PIL images per text for a VLM (its processor expands the image tokens)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = []
        for i, t in enumerate(texts):
            imgs = images[i] if images is not None else None
            if imgs:
                if self.processor is None:
                    raise ValueError(f"{self.path}: a text-only reward model got images")
                enc = self.processor(text=[t], images=imgs, return_tensors="pt")
                media = {k: v for k, v in enc.items() if k not in ("input_ids",
                                                                   "attention_mask")}
                out.append(self.score_ids(enc["input_ids"], **media))
            else:
                ids = self.tokenizer(t, return_tensors="pt", add_special_tokens=False)
                out.append(self.score_ids(ids["input_ids"]))
        return torch.stack(out)


def load_reward_model(path: str | Path, device: str | torch.device = "cpu",
                      dtype: torch.dtype | None = None) -> RewardModel:
    """The reward model in ``path`` (an ``mvlm rlhf --rlhf_type rm`` export), in eval mode."""
    import transformers
    from safetensors.torch import load_file

    path = Path(path)
    meta_file = path / META_FILE
    if not meta_file.exists():
        raise ValueError(f"{path}: no {META_FILE}, so not a reward model exported by mvlm rlhf "
                         "--rlhf_type rm (train one, or pass that run's output_dir/hf)")
    meta = json.loads(meta_file.read_text())
    kind = meta.get("head")
    kw: dict[str, Any] = {} if dtype is None else {"dtype": dtype}
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    processor = None
    if kind == "sequence_classification":
        model = transformers.AutoModelForSequenceClassification.from_pretrained(path, **kw)
        head = None
    elif kind == "value_head":
        cfg = transformers.AutoConfig.from_pretrained(path)
        if getattr(cfg, "vision_config", None) is not None:
            model = transformers.AutoModelForImageTextToText.from_pretrained(path, **kw)
            try:
                processor = transformers.AutoProcessor.from_pretrained(path)
            except (OSError, ValueError):
                processor = None
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(path, **kw)
        head = load_file(str(path / meta["file"]))["score.weight"]
    else:
        raise ValueError(f"{meta_file}: unknown head kind {kind!r} (sequence_classification or "
                         "value_head)")
    model.to(device).eval()
    return RewardModel(path, kind, model, tokenizer, head, processor)


__all__ = ["RewardModel", "load_reward_model"]
