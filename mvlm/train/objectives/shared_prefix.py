"""Shared-prefix pair rows: a preference pair as ONE prompt followed by both answers.

The collator packs a pair as two segments, prompt+chosen and prompt+rejected
(:func:`mvlm.data.preference.collate_pairs`), so the prompt -- image placeholders included --
goes through the decoder twice. :func:`share_prefix` re-lays such a row out as three segments
per pair, ``[prompt][chosen][rejected]``, with ``segment_parent`` saying that both answer
segments also attend to the prompt segment (causally, by row order) and neither to the other
(:func:`mvlm.models.attention._segment_parents`). Each answer keeps the positions it had in its
own sequence (RoPE ids, or mRoPE's t/h/w ids), so the rejected answer continues from the prompt
as if it followed it directly: every token sees exactly the keys, at exactly the positions, it
saw in its own sequence, and the per-sequence log-probs are unchanged (the tests hold them
equal to each sequence run alone). The prompt, and the vision tower on its media, run once per
pair.

What is shared: the longest common leading run of the two sequences where token ids and
position ids agree and neither carries a (shifted) label. Labels are shifted per sequence (the
label at ``t`` is token ``t+1``), so the prompt's LAST token, which predicts each answer's first
token, is repeated at the head of both answer segments. Nothing depends on how a family computes
positions: a scheme whose prompt positions differed between the two sequences would simply
share less (nothing, in the limit), never compute something else.

When a micro-batch keeps the two-segment layout (``share_prefix`` returns None): KTO rows (the
KTO objective reads its rows' two segments by index), media that the pair bookkeeping does not
describe (e.g. Qwen2.5-Omni's audio), or a media placeholder that falls outside the shared
prompt. When a run keeps it (:func:`why_not_shared`): a core attention other than mvlm's
``SDPACoreAttention`` (the Transformer Engine spec has no tree mask), or THD packing (Megatron's
THD RoPE restarts positions per segment, which would move the answers' positions).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from mvlm.train.objectives.pair_media import first_copies
from mvlm.train.steps import unwrap

log = logging.getLogger(__name__)

# HF config attributes naming media placeholder tokens (the families' spellings)
_PLACEHOLDER_ATTRS = ("image_token_id", "video_token_id", "image_token_index",
                      "video_token_index", "audio_token_id", "audio_token_index",
                      "image_pad_token_id", "video_pad_token_id", "img_context_token_id")


def why_not_shared(models: Sequence[Any]) -> str | None:
    """Why this run's model chunks cannot take shared-prefix rows (None: they can)."""
    from mvlm.models.attention import SDPACoreAttention

    for chunk in models:
        m = unwrap(chunk)
        fmt = getattr(m.config, "packed_qkv_format", "sbhd")
        if fmt != "sbhd":
            return (f"packed_qkv_format={fmt} (THD RoPE restarts positions per segment, so the "
                    "rejected answer could not continue from the shared prompt)")
        for mod in m.modules():
            core = getattr(mod, "core_attention", None)
            if core is not None and not isinstance(core, SDPACoreAttention):
                return (f"core attention {type(core).__name__} has no tree mask (only mvlm's "
                        "SDPACoreAttention, the local spec, has)")
    return None


def placeholder_ids(hf_config: Any) -> torch.Tensor:
    """The media placeholder token ids an HF config names (top level and text_config)."""
    ids: set[int] = set()
    for cfg in (hf_config, getattr(hf_config, "text_config", None)):
        for a in _PLACEHOLDER_ATTRS:
            v = getattr(cfg, a, None) if cfg is not None else None
            if isinstance(v, int):
                ids.add(v)
    return torch.tensor(sorted(ids), dtype=torch.long)


def _shared_len(ids_a: torch.Tensor, ids_b: torch.Tensor, pos_a: torch.Tensor,
                pos_b: torch.Tensor, lab_a: torch.Tensor, lab_b: torch.Tensor) -> int:
    """Leading tokens two sequences can share: same id, same position ids, no label in either;
    each sequence keeps at least one token of its own."""
    n = min(len(ids_a), len(ids_b)) - 1
    if n <= 0:
        return 0
    same = (ids_a[:n] == ids_b[:n]) & (pos_a[:, :n] == pos_b[:, :n]).all(0) & \
        (lab_a[:n] == -100) & (lab_b[:n] == -100)
    return int(same.to(torch.long).cumprod(0).sum())


def _plan_segments(batch: dict, ids: torch.Tensor, labels: torch.Tensor, pos: torch.Tensor,
                   spans: list[tuple[int, int]], placeholders: torch.Tensor):
    """Per pair: the shared prompt once, then chosen and rejected answers as its children.
    Returns (parts, parent, chosen, rejected) — ``parts`` are (start, end) spans of the old row
    in the new row's order — or None when a media placeholder lies outside the shared prompt."""
    parts: list[tuple[int, int]] = []
    parent: list[int] = []
    chosen, rejected = [], []
    for c, r in zip(batch["chosen_index"].tolist(), batch["rejected_index"].tolist()):
        (a0, a1), (b0, b1) = spans[c], spans[r]
        k = _shared_len(ids[a0:a1], ids[b0:b1], pos[:, a0:a1], pos[:, b0:b1], labels[a0:a1],
                        labels[b0:b1])
        if placeholders.numel() and (torch.isin(ids[a0 + k:a1], placeholders).any()
                                     or torch.isin(ids[b0 + k:b1], placeholders).any()):
            return None  # a placeholder outside the shared prompt: its media would be needed twice
        root = -1
        if k:
            root = len(parts)
            parts.append((a0, a0 + k))
            parent.append(-1)
        chosen.append(len(parts))
        parts.append((a0 + k, a1))
        parent.append(root)
        rejected.append(len(parts))
        parts.append((b0 + k, b1))
        parent.append(root)
    return parts, parent, chosen, rejected


def share_prefix(batch: dict, kinds: Sequence[Any], media_keys: Sequence[str],
                 placeholders: torch.Tensor, pad_id: int, pad_multiple: int = 1) -> dict | None:
    """A collated two-segment pair row -> the shared-prefix row (module docstring), or None
    where this micro-batch keeps the two-segment layout.

    ``kinds``: the family's media kinds (``VisionSpec.media``); ``media_keys``: every media key
    the family's batches carry (``FamilySpec.batch_keys``); ``placeholders``: media placeholder
    token ids (:func:`placeholder_ids`); ``pad_multiple``: the collator's row multiple (2*CP,
    times TP under sequence parallelism). The row is rebuilt without per-sample CP padding: under
    the sbhd layout CP splits the whole row, so only its length must divide."""
    if batch.get("kto_label") is not None or batch.get("segment_parent") is not None:
        return None
    info = batch.get("pair_media") or {}
    handled = set()
    for k in kinds:
        if k.features_key in info:
            handled |= {k.features_key, *([k.grid_key] if k.grid_key else []), *k.extra_keys}
    if any(batch.get(k) is not None and k not in handled for k in media_keys):
        return None  # media without pair bookkeeping (audio): the tower must see both copies
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    pos = batch["position_ids"][:, 0]
    cu = batch["cu_seqlens"].tolist()
    real = batch.get("cu_seqlens_unpadded")
    real = cu if real is None else torch.as_tensor(real).tolist()
    spans = [(cu[i], cu[i] + real[i + 1] - real[i]) for i in range(len(cu) - 1)]
    plan = _plan_segments(batch, ids, labels, pos, spans, placeholders.to(ids.device))
    if plan is None:
        return None
    parts, parent, chosen, rejected = plan
    index = torch.cat([torch.arange(s, e, device=ids.device) for s, e in parts])
    lens = [e - s for s, e in parts]
    total = int(index.numel())
    seq = -(-total // pad_multiple) * pad_multiple if pad_multiple > 1 else total
    out = {k: v for k, v in batch.items()
           if k not in ("pair_media", "cu_seqlens_unpadded", "attention_mask")}
    new_ids = ids.new_full((1, seq), pad_id)
    new_ids[0, :total] = ids[index]
    new_labels = labels.new_full((1, seq), -100)
    new_labels[0, :total] = labels[index]
    new_pos = pos.new_zeros((pos.shape[0], 1, seq))
    new_pos[:, 0, :total] = pos[:, index]
    out.update(input_ids=new_ids, labels=new_labels, position_ids=new_pos,
               loss_mask=(new_labels != -100).float())
    bounds = torch.zeros(len(lens) + 1, dtype=torch.int32)
    bounds[1:] = torch.cumsum(torch.tensor(lens, dtype=torch.int32), 0)
    dev = batch["cu_seqlens"].device
    out["cu_seqlens"] = bounds.to(dev)
    out["max_seqlen"] = max(lens)
    out["num_samples"] = len(lens)
    out["segment_parent"] = torch.tensor(parent, dtype=torch.long, device=dev)
    out["chosen_index"] = torch.tensor(chosen, dtype=torch.long,
                                       device=batch["chosen_index"].device)
    out["rejected_index"] = torch.tensor(rejected, dtype=torch.long,
                                         device=batch["rejected_index"].device)
    for kind in kinds:  # each pair's media once: its placeholders are in the prompt, once
        fk = kind.features_key
        if fk not in info or batch.get(fk) is None:
            continue
        rows, items = info[fk]["rows"], info[fk]["items"]
        out[fk] = first_copies(batch[fk], rows)
        for key in ([kind.grid_key] if kind.grid_key else []) + list(kind.extra_keys):
            if batch.get(key) is not None:
                out[key] = first_copies(batch[key], items)
    return out


class PrefixSharer:
    """Per run: decides once whether the model takes shared-prefix rows (an info line when not)
    and converts a step's micro-batches (re-padded to one length where PP/EP need it)."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.decided = False
        self._kept: set[str] = set()

    def decide(self, trainer: Any) -> bool:
        if not self.decided:
            self.decided = True
            self.reason = why_not_shared(trainer.ddp_models)
            if self.reason is not None:
                log.info("preference pairs keep the two-segment layout (prompt+chosen, "
                         "prompt+rejected; the prompt runs twice): %s", self.reason)
        return self.reason is None

    def __call__(self, trainer: Any, batches: list[dict]) -> list[dict]:
        if not batches or not self.decide(trainer):
            return batches
        from mvlm.train.batches import same_length

        m = unwrap(trainer.ddp_models[0])
        family = m.family
        kinds = family.vision.media if family.vision is not None else ()
        layout = trainer.layout
        mult = 2 * layout.cp if layout.cp > 1 else 1
        if trainer.cfg.parallel.sequence_parallel:
            mult *= layout.tp
        holders = placeholder_ids(trainer.bundle.hf_config)
        out = []
        for b in batches:
            s = share_prefix(b, kinds, family.batch_keys, holders, trainer.pad_id or 0, mult)
            if s is None:
                why = "KTO rows" if b.get("kto_label") is not None else \
                    "media outside the shared prompt or without pair bookkeeping"
                if why not in self._kept:
                    self._kept.add(why)
                    log.info("a micro-batch keeps the two-segment pair layout: %s", why)
                s = b
            out.append(s)
        return same_length(out, layout.pp, layout.ep, trainer.pad_id)
