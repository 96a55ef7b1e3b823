"""The context-parallel sequence split: which tokens each CP rank holds (the one implementation).

Why one module: the model (embeddings, labels), the attention (K/V re-ordering after the
all-gather), the data pipeline (packed rows) and the checks (loss masks, HF references) must agree
on the layout to the token, so they all call these helpers instead of re-deriving it. Torch only,
no Megatron import, so the data workers can use it cheaply.

Layout (Megatron-Core's load-balanced one, as in its RoPE ``get_pos_emb_on_this_cp_rank``): a
length-``S`` sequence is cut into ``2*CP`` equal chunks and CP rank ``r`` holds chunks ``r`` and
``2*CP-1-r``, in that order. An early chunk (few keys to attend to) is paired with a late one
(many), so every rank does the same causal-attention work. Packed rows follow Transformer
Engine's THD layout instead: every sample is split ``2*CP`` ways on its own.
"""
from __future__ import annotations

import itertools

import torch

__all__ = ["cp_chunk_indices", "cp_packed_indices", "split_for_cp"]


def cp_chunk_indices(seq_len: int, cp_size: int, cp_rank: int,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """Global positions (int64) held by ``cp_rank`` of a length-``seq_len`` sequence, in that
    rank's local order. ``seq_len`` must be a multiple of 2*CP (the collator pads to one)."""
    if cp_size < 1 or not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank={cp_rank} must be in [0, cp_size={cp_size})")
    if cp_size == 1:
        return torch.arange(seq_len, device=device)
    n = 2 * cp_size
    if seq_len % n:
        raise ValueError(
            f"sequence length {seq_len} is not divisible by 2*CP={n}: pad the (packed) sequence "
            f"to a multiple of 2*CP (the data pipeline does this when given the layout: "
            f"Collator(cp_size=...), pad_to_multiple_of a multiple of {n})")
    c = seq_len // n
    return torch.cat([torch.arange(cp_rank * c, (cp_rank + 1) * c, device=device),
                      torch.arange((n - 1 - cp_rank) * c, (n - cp_rank) * c, device=device)])


def split_for_cp(tensor: torch.Tensor, seq_dim: int, cp_size: int,
                 cp_rank: int) -> torch.Tensor:
    """The slice of ``tensor`` along ``seq_dim`` that CP rank ``cp_rank`` holds (see module doc);
    ``tensor`` itself when CP is off."""
    if cp_size == 1:
        return tensor
    idx = cp_chunk_indices(tensor.size(seq_dim), cp_size, cp_rank, device=tensor.device)
    return tensor.index_select(seq_dim, idx)


def cp_packed_indices(cu_seqlens_padded: torch.Tensor, cp_size: int, cp_rank: int,
                      seq_len: int | None = None) -> torch.Tensor:
    """THD + CP (Transformer Engine's layout): the 2*CP split applied to every packed sample
    separately; returns this rank's token indices in the packed row (on ``cu_seqlens_padded``'s
    device).

    Every sample length must be a multiple of 2*CP (``Collator(cp_size=...)`` pads them).
    ``seq_len`` (the row length) makes the pad tail after the last sample a segment of its own,
    so the whole row is covered.
    """
    bounds = [int(b) for b in cu_seqlens_padded.tolist()]
    if seq_len is not None and seq_len > bounds[-1]:
        bounds.append(seq_len)
    device = cu_seqlens_padded.device
    parts = [cp_chunk_indices(end - start, cp_size, cp_rank, device=device) + start
             for start, end in itertools.pairwise(bounds) if end > start]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)
