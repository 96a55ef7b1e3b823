"""Micro-batch shaping the schedule needs: one length per step under PP/EP, token counts.

Pipeline stages exchange one activation shape per step, and the CPU MoE all-gather dispatcher
needs equal token counts on every EP rank, so a step's micro-batches are right-padded to one
length (the max over the world when EP > 1). Pads carry no loss, position 0, and are masked as
keys; packed micro-batches (N packed rows concatenated into one row) get a longer tail, which is
a segment of its own.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def pad_to(batch: dict, seq: int, pad_id: int) -> dict:
    """Right-pad a micro-batch to ``seq`` tokens."""
    s = batch["input_ids"].shape[1]
    if s == seq:
        return batch
    n = seq - s
    out = dict(batch)
    out["input_ids"] = torch.nn.functional.pad(batch["input_ids"], (0, n), value=pad_id)
    out["labels"] = torch.nn.functional.pad(batch["labels"], (0, n), value=-100)
    if "loss_mask" in batch:
        out["loss_mask"] = torch.nn.functional.pad(batch["loss_mask"], (0, n), value=0)
    out["position_ids"] = torch.nn.functional.pad(batch["position_ids"], (0, n), value=0)
    if batch.get("attention_mask") is not None:
        out["attention_mask"] = torch.nn.functional.pad(batch["attention_mask"], (0, n),
                                                        value=False)
    return out


def same_length(batches: list[dict], pp: int, ep: int, pad_id: int | None) -> list[dict]:
    """The step's micro-batches padded to one length when PP > 1 or EP > 1 (collective over the
    world when EP > 1); unchanged otherwise."""
    if pp == 1 and ep == 1:
        return batches
    if pad_id is None:
        raise ValueError("padding micro-batches to one length (PP/EP > 1) needs the tokenizer's "
                         "pad id: give the Trainer one (trainer.pad_id)")
    seq = max(b["input_ids"].shape[1] for b in batches)
    if ep > 1:
        t = torch.tensor([seq], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        seq = int(t)
    return [pad_to(b, seq, pad_id) for b in batches]


def token_count(batch: dict) -> int:
    """Tokens fed (padding included): the throughput count."""
    if batch.get("cu_seqlens") is not None:
        return int(batch["cu_seqlens"][-1])
    if batch.get("attention_mask") is not None:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())
