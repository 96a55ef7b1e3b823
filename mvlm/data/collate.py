"""Collation: encoded samples -> the micro-batch dict the model and trainer consume.

The batch contract (names are fixed; the model and trainer read exactly these keys):

* ``input_ids`` [B, S] long; ``labels`` [B, S] long, already shifted Megatron-style
  (``labels[t]`` is the target predicted at position t; -100 on prompt/vision tokens, on the last
  token of every sample and on padding); ``loss_mask`` [B, S] float = labels != -100.
* ``position_ids`` [3, B, S] long for every family, restarting at 0 per packed sample; 0 on pads.
* padded batches: ``attention_mask`` [B, S] bool (True = real token).
* packed batches (B = 1): ``cu_seqlens`` int32 [n+1] (sample boundaries; the pad tail is not a
  sample) and ``max_seqlen`` int; no attention_mask. A micro-batch of N packed rows (the
  sampler's items) is ONE row: the rows' samples concatenated in order (see
  :func:`collate_packed_rows`); ``num_rows`` = N.
* media: the keys the model's family declares (``FamilySpec.batch_keys`` in
  mvlm.models.registry), each concatenated over the micro-batch in sample order -- for Qwen-VL
  ``pixel_values`` [N_patches, D], ``image_grid_thw`` [N_images, 3]; ``pixel_values_videos``,
  ``video_grid_thw``, ``second_per_grid_ts`` likewise. Keys are absent when the micro-batch has no
  such media.
* ``num_samples`` int.

Labels are shifted per sample *before* concatenation, which is why packing can never make one
sample's last token predict the next sample's first token.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Megatron-style targets for ONE sample: out[t] = labels[t+1], out[-1] = -100."""
    out = torch.full_like(labels, -100)
    out[:-1] = labels[1:]
    return out


def _as_long(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) and x.dtype == torch.long else \
        torch.as_tensor(x, dtype=torch.long)


def _positions(s: dict, n: int) -> torch.Tensor:
    p = s.get("position_ids")
    if p is None:
        return torch.arange(n, dtype=torch.long).unsqueeze(0).expand(3, -1)
    p = _as_long(p)
    return p.unsqueeze(0).expand(3, -1) if p.dim() == 1 else p


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m if m > 1 else n


def _vision(samples: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Every media key of the registry's families (``FamilySpec.batch_keys``), concatenated in
    sample order with the dtype the family declares."""
    from mvlm.models.registry import media_keys

    out = {}
    for key, dtype in media_keys().items():
        parts = [torch.as_tensor(s[key], dtype=getattr(torch, dtype)) for s in samples
                 if s.get(key) is not None and len(s[key]) > 0]
        if parts:
            out[key] = torch.cat(parts)
    return out


def collate_padded(samples: Sequence[dict], pad_token_id: int,
                   pad_to_multiple_of: int = 1) -> dict[str, Any]:
    """[B, S] batch, right-padded to the longest sample (rounded up to the multiple)."""
    ids = [_as_long(s["input_ids"]) for s in samples]
    seq = _round_up(max(len(x) for x in ids), pad_to_multiple_of)
    b = len(samples)
    input_ids = torch.full((b, seq), pad_token_id, dtype=torch.long)
    labels = torch.full((b, seq), -100, dtype=torch.long)
    position_ids = torch.zeros((3, b, seq), dtype=torch.long)
    attention_mask = torch.zeros((b, seq), dtype=torch.bool)
    for i, (s, x) in enumerate(zip(samples, ids)):
        n = len(x)
        input_ids[i, :n] = x
        labels[i, :n] = shift_labels(_as_long(s["labels"]))
        position_ids[:, i, :n] = _positions(s, n)
        attention_mask[i, :n] = True
    batch = {"input_ids": input_ids, "labels": labels, "loss_mask": (labels != -100).float(),
             "position_ids": position_ids, "attention_mask": attention_mask, "num_samples": b}
    batch.update(_vision(samples))
    if any(s.get("extra") for s in samples):  # carried columns per row (RL rewards read them)
        batch["extra"] = [dict(s.get("extra") or {}) for s in samples]
    return batch


def collate_packed(samples: Sequence[dict], pad_token_id: int,
                   pad_to_multiple_of: int = 1) -> dict[str, Any]:
    """One padding-free row [1, S]: samples concatenated, tail padded to the multiple."""
    ids = [_as_long(s["input_ids"]) for s in samples]
    lens = [len(x) for x in ids]
    total = sum(lens)
    seq = _round_up(total, pad_to_multiple_of)
    input_ids = torch.full((1, seq), pad_token_id, dtype=torch.long)
    labels = torch.full((1, seq), -100, dtype=torch.long)
    position_ids = torch.zeros((3, 1, seq), dtype=torch.long)
    input_ids[0, :total] = torch.cat(ids)
    labels[0, :total] = torch.cat([shift_labels(_as_long(s["labels"])) for s in samples])
    position_ids[:, 0, :total] = torch.cat([_positions(s, n) for s, n in zip(samples, lens)],
                                           dim=1)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens, dtype=torch.int32), 0)
    batch = {"input_ids": input_ids, "labels": labels, "loss_mask": (labels != -100).float(),
             "position_ids": position_ids, "cu_seqlens": cu, "max_seqlen": max(lens),
             "num_samples": len(samples)}
    batch.update(_vision(samples))
    return batch


def unpack(batch: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
    """Per-sample views of a packed batch: input_ids, labels, loss_mask, position_ids slices.

    For checks such as "perturb one packed sample, the others' logits must not move": slice the
    model output with the same ``cu_seqlens`` boundaries.
    """
    cu = batch["cu_seqlens"].tolist()
    out = []
    for s, e in itertools.pairwise(cu):
        out.append({"input_ids": batch["input_ids"][0, s:e], "labels": batch["labels"][0, s:e],
                    "loss_mask": batch["loss_mask"][0, s:e],
                    "position_ids": batch["position_ids"][:, 0, s:e], "span": (s, e)})
    return out


def collate_packed_rows(rows: Sequence[Any], pad_token_id: int, pad_to_multiple_of: int = 1,
                        cp_size: int = 1) -> dict[str, Any]:
    """A micro-batch of N packed rows -> ONE padding-free row [1, S] with per-sample cu_seqlens.

    Why one row and not [N, max_length]: samples are already kept apart by their cu_seqlens
    segments (attention never crosses a boundary, labels are shifted per sample, positions restart
    per sample), so putting N rows' samples side by side computes exactly what N separate
    micro-batches of one row compute -- the same per-token losses, hence the same loss sum and
    gradients -- with no padding between rows and no batched packed-attention path to add. Only
    the tail pad (to ``pad_to_multiple_of``) differs, and pads carry no loss and are a segment of
    their own. ``rows`` items are lists of samples (a plain sample counts as a row of one).

    ``cp_size > 1`` pads every sample to a multiple of 2*CP first (see :class:`Collator`).
    """
    samples = [s for row in rows for s in (row if isinstance(row, list) else [row])]
    if not samples:
        raise ValueError("a packed micro-batch needs at least one sample")
    if cp_size > 1:
        real = [len(s["input_ids"]) for s in samples]
        samples, _ = pad_samples_for_cp(samples, cp_size, pad_token_id)
        batch = collate_packed(samples, pad_token_id, pad_to_multiple_of)
        cu = torch.zeros(len(real) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(real, dtype=torch.int32), 0)
        batch["cu_seqlens_unpadded"] = cu
        batch["max_seqlen"] = max(real)
    else:
        batch = collate_packed(samples, pad_token_id, pad_to_multiple_of)
    batch["num_rows"] = len(rows)
    return batch


class Collator:
    """Picklable collate_fn for torch DataLoader (packed: each item is a list of samples, and the
    items of one micro-batch become one row, see :func:`collate_packed_rows`).

    ``cp_size > 1`` with packing pads every sample to a multiple of 2*CP (pads carry no loss and
    position 0), so ``mvlm.runtime.cp.cp_packed_indices(batch["cu_seqlens"], cp, rank, seq_len)``
    can split each sample into 2*CP load-balanced chunks; ``cu_seqlens`` then holds the padded
    boundaries (right for causal attention: a real token never attends to its sample's trailing
    pads) and
    ``cu_seqlens_unpadded`` the real ones (Megatron-Core's ``cu_seqlens_q`` vs ``_q_padded``).
    """

    def __init__(self, pad_token_id: int, packing: bool = False, pad_to_multiple_of: int = 1,
                 cp_size: int = 1):
        self.pad_token_id = pad_token_id
        self.packing = packing
        self.cp_size = cp_size
        self.pad_to_multiple_of = pad_to_multiple_of
        if cp_size > 1 and pad_to_multiple_of % (2 * cp_size):
            raise ValueError(f"pad_to_multiple_of={pad_to_multiple_of} must be a multiple of "
                             f"2*CP={2 * cp_size} (pass 2*CP*TP)")

    def __call__(self, items: Sequence[Any]) -> dict[str, Any]:
        first = items[0] if items else None
        if isinstance(first, list) and first:
            first = first[0]
        if isinstance(first, dict) and "rejected_input_ids" in first:
            # preference pairs: always one packed row, each pair two segments (one forward per
            # pair, with or without --packing): mvlm.data.preference.collate_pairs
            from mvlm.data.preference import collate_pairs

            return collate_pairs(items, self.pad_token_id, self.pad_to_multiple_of,
                                 self.cp_size)
        if self.packing:
            return collate_packed_rows(items, self.pad_token_id, self.pad_to_multiple_of,
                                       self.cp_size)
        return collate_padded(items, self.pad_token_id, self.pad_to_multiple_of)


# ----------------------------------------------------------------------------- context parallel
# The split itself (cp_chunk_indices / cp_packed_indices) lives in mvlm.runtime.cp.

def pad_samples_for_cp(batch_samples: Sequence[dict], cp_size: int,
                       pad_token_id: int) -> tuple[list[dict], torch.Tensor]:
    """Pad each sample (ids/labels/positions) to a multiple of 2*CP before packing.

    Returns the padded samples and ``cu_seqlens_padded`` -- what Megatron-Core's THD + CP path
    wants (``PackedSeqParams.cu_seqlens_q_padded``). Padding carries no loss.
    """
    m = 2 * cp_size
    out, lens = [], []
    for s in batch_samples:
        ids = _as_long(s["input_ids"])
        n = len(ids)
        extra = _round_up(n, m) - n
        t = dict(s)
        if extra:
            t["input_ids"] = torch.cat([ids, torch.full((extra,), pad_token_id)])
            t["labels"] = torch.cat([_as_long(s["labels"]), torch.full((extra,), -100)])
            pos = _positions(s, n)
            t["position_ids"] = torch.cat([pos, torch.zeros(3, extra, dtype=torch.long)], dim=1)
        out.append(t)
        lens.append(n + extra)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens, dtype=torch.int32), 0)
    return out, cu
