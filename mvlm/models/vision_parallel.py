"""The vision tower's work divided over the tensor- and context-parallel ranks instead of repeated.

Every rank of a TP x CP group receives the same micro-batch, and the tower is replicated on all of
them (HF modules, kept whole so the weights map 1:1). Running it on every image on every rank
repeats the ViT's FLOPs TP x CP times. Instead, each rank runs the tower on a contiguous block of
the micro-batch's images (videos, tiles) and the blocks are all-gathered, so that every rank again
holds every feature row for the merge and the CP split that follow.

Why split images rather than shard the tower's weights as Megatron layers: sharding the ViT's
linears by TP would need a mapping of HF's fused qkv/merger weights per family, a TP-sized
all-reduce per block per micro-batch, and it would not divide anything over CP. Splitting images
keeps the HF module (exact numerics, 1:1 weights), works for every family whose tower treats
items independently, divides the work over TP x CP, and communicates only the merged features
(``n_tokens x text_hidden`` per micro-batch, what the decoder's embedding already moves).
Its limit: one image is not divided (a rank with no image waits at the gather).

Contract of a splittable tower: ``tower(pixel_values, grid)`` treats items independently and
returns their features in item order. With a grid (Qwen-VL), item ``i`` owns ``prod(grid[i])``
consecutive rows of ``pixel_values``; without one (LLaVA, InternVL tiles) each row is an item.
Items go to ranks in contiguous blocks with the largest block (counted in rows, i.e. patches)
as small as possible, so the gathered rows come back in the original order.

Gradients, so that they equal the unsplit run (and the single-rank run):

* Features. After the gather, the gradient each rank receives for the full feature matrix is the
  same on all TP ranks (the decoder's TP regions all-reduce it, or gather it under sequence
  parallelism) and is a partial sum on each CP rank (each keeps only its sequence chunks). The
  gather's backward therefore sums over the CP group only and returns this rank's block of rows.
* Parameters. Each rank now back-propagates only its own images, so its tower gradients are a
  part of the whole. Before the split, every TP rank held the whole gradient of the replicated
  tower (nothing reduced it over TP) and CP ranks held parts that Megatron's DDP sums over
  DP x CP. So the parts must be summed over TP exactly once and left to DDP over CP. This is
  done inside autograd: the trainable tower parameters enter the forward through an identity
  whose backward all-reduces (sums) their gradients over the TP group, in one flat buffer per
  dtype. That covers parameters outside the tower's tree that its forward reads (LoRA/DoRA
  adapters hooked onto its linears, passed in by the model). The gradients are thus right the
  moment backward returns (whatever reads them: Megatron's DDP hooks, tests), instead of
  relying on ``finalize_model_grads`` and a parameter attribute that every adapter created
  after the model would also need. The price
  is one reduction per micro-batch rather than per step; with the ms-swift default (ViT frozen,
  aligner trained) that is the aligner's gradient only.

Unbalanced and text-only micro-batches: which items exist is the same on every rank of the
group (same micro-batch), so every rank decides the same partition and enters the same
collectives. A rank whose block is empty still gathers (lengths first, then rows) and, when any
tower parameter is trainable, adds ``0 * sum(parameters)`` to its empty block so its backward
runs the same reductions as the others. A micro-batch without media runs no collective at all,
on every rank alike.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class VisionSplit:
    """The process groups the tower's items are divided over: ``group`` = TP x CP (items are
    assigned by rank in it), ``tp_group`` (parameter gradients are summed over it) and
    ``cp_group`` (feature gradients are summed over it)."""

    group: dist.ProcessGroup
    tp_group: dist.ProcessGroup
    cp_group: dist.ProcessGroup

    @property
    def size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @classmethod
    def from_parallel_state(cls) -> VisionSplit | None:
        """The split over Megatron-Core's TP x CP group, or None when that group has one rank
        (nothing to divide)."""
        from megatron.core import parallel_state

        tp = parallel_state.get_tensor_model_parallel_world_size()
        cp = parallel_state.get_context_parallel_world_size()
        if tp * cp == 1:
            return None
        return cls(group=parallel_state.get_tensor_and_context_parallel_group(),
                   tp_group=parallel_state.get_tensor_model_parallel_group(),
                   cp_group=parallel_state.get_context_parallel_group())


def balanced_blocks(costs: Sequence[int], parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous (start, end) blocks of ``costs`` whose largest sum is the smallest
    possible (later blocks may be empty). Binary search on that largest sum with a greedy fill:
    O(n log sum), deterministic, so every rank computes the same blocks."""
    if not costs:
        return [(0, 0)] * parts

    def fill(cap: int) -> list[tuple[int, int]] | None:
        blocks, start, acc = [], 0, 0
        for i, c in enumerate(costs):
            if acc + c > cap and i > start:
                blocks.append((start, i))
                start, acc = i, 0
            acc += c
        blocks.append((start, len(costs)))
        if len(blocks) > parts:
            return None
        return blocks + [(len(costs), len(costs))] * (parts - len(blocks))

    lo, hi = max(costs), sum(costs)
    while lo < hi:
        mid = (lo + hi) // 2
        if fill(mid) is None:
            lo = mid + 1
        else:
            hi = mid
    return fill(lo)  # type: ignore[return-value]


def item_rows(pixel_values: torch.Tensor, grid: torch.Tensor | None) -> list[int]:
    """Rows of ``pixel_values`` per item (see the module docstring); raises, identically on
    every rank, when the grid does not cover the rows (before any rank enters a collective)."""
    if grid is None:
        return [1] * int(pixel_values.shape[0])
    rows = [int(r) for r in grid.prod(dim=-1).tolist()]
    if sum(rows) != pixel_values.shape[0]:
        raise ValueError(f"the grid covers {sum(rows)} rows but pixel_values has "
                         f"{pixel_values.shape[0]}: re-encode the sample with the model's "
                         "processor")
    return rows


class _SumGradsOverGroup(torch.autograd.Function):
    """Identity on the parameters; backward sums their gradients over ``group`` (one flat
    all-reduce per dtype)."""

    @staticmethod
    def forward(ctx, group, *params):  # noqa: ANN001 - autograd signature
        ctx.group = group
        return tuple(p.view_as(p) for p in params)

    @staticmethod
    def backward(ctx, *grads):  # noqa: ANN001
        out = list(grads)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, g in enumerate(grads):
            by_dtype.setdefault(g.dtype, []).append(i)
        for idx in by_dtype.values():
            flat = torch.cat([grads[i].reshape(-1) for i in idx])
            dist.all_reduce(flat, group=ctx.group)
            for i, piece in zip(idx, flat.split([grads[i].numel() for i in idx])):
                out[i] = piece.view_as(grads[i])
        return (None, *out)


class _GatherRows(torch.autograd.Function):
    """All-gather of row blocks of different lengths over ``group`` (padded to the longest, the
    padding dropped). Backward: the incoming gradient summed over ``cp_group`` (TP copies are
    equal already), then this rank's rows."""

    @staticmethod
    def forward(ctx, local, lengths, rank, group, cp_group):  # noqa: ANN001
        longest = max(lengths)
        padded = local.new_zeros((longest, *local.shape[1:]))
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in lengths]
        dist.all_gather(parts, padded.contiguous(), group=group)
        ctx.start = sum(lengths[:rank])
        ctx.end = ctx.start + lengths[rank]
        ctx.cp_group = cp_group
        return torch.cat([p[:n] for p, n in zip(parts, lengths)])

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        if dist.get_world_size(ctx.cp_group) > 1:
            grad = grad.contiguous().clone()
            dist.all_reduce(grad, group=ctx.cp_group)
        return grad[ctx.start:ctx.end], None, None, None, None


def _check_no_checkpointing(tower: nn.Module) -> None:
    if any(getattr(m, "gradient_checkpointing", False) is True for m in tower.modules()):
        raise ValueError("the vision tower has HF gradient checkpointing on: its recompute would "
                         "bypass the TP gradient sum of the split tower; turn checkpointing off "
                         "or build the model with vit_parallel=False")


TrainableParam = tuple[nn.Module, str]  # (module, attribute name) of a parameter


def tower_trainable(tower: nn.Module, extra: Sequence[nn.Module] = ()) -> list[TrainableParam]:
    """The trainable parameters the tower's forward reads: its own and those of ``extra``
    modules that act on it from outside its tree (adapters hooked onto its linears)."""
    out: list[TrainableParam] = []
    for mod in (*tower.modules(), *extra):
        out += [(mod, n) for n, p in mod.named_parameters(recurse=False) if p.requires_grad]
    return out


@contextmanager
def _swapped(params: Sequence[TrainableParam], values: Sequence[torch.Tensor]) -> Iterator[None]:
    """The parameters replaced by ``values`` (what ``torch.func.functional_call`` does, for
    parameters that may live outside one module tree), restored on exit."""
    saved = [mod._parameters[n] for mod, n in params]
    try:
        for (mod, n), v in zip(params, values):
            mod._parameters[n] = v
        yield
    finally:
        for (mod, n), p in zip(params, saved):
            mod._parameters[n] = p


def split_tower_outputs(tower: nn.Module,
                        inputs: Sequence[tuple[torch.Tensor, torch.Tensor | None]],
                        split: VisionSplit,
                        trainable: Sequence[TrainableParam] | None = None
                        ) -> list[torch.Tensor]:
    """``[tower(pixels, grid) for pixels, grid in inputs]`` with the items of all inputs divided
    over ``split.group`` (one partition over all of them, balanced by rows) and gathered back:
    the same values on every rank of the group, in the same order. Collective over the group.
    ``trainable``: the trainable parameters the tower reads (default: :func:`tower_trainable`
    of the tower alone); their gradients are summed over TP (module docstring)."""
    rows = [item_rows(px, grid) for px, grid in inputs]
    flat = [(k, i) for k, r in enumerate(rows) for i in range(len(r))]
    start, end = balanced_blocks([rows[k][i] for k, i in flat], split.size)[split.rank]
    mine = flat[start:end]
    if trainable is None:
        trainable = tower_trainable(tower)
    leaves = [mod._parameters[n] for mod, n in trainable]
    differentiable = bool(leaves) and torch.is_grad_enabled()
    used = leaves
    if differentiable and dist.get_world_size(split.tp_group) > 1:
        _check_no_checkpointing(tower)
        used = list(_SumGradsOverGroup.apply(split.tp_group, *leaves))
    dtype = next(tower.parameters()).dtype
    local: list[torch.Tensor] = []
    counts: list[int] = []
    for k, (px, grid) in enumerate(inputs):
        idx = [i for kk, i in mine if kk == k]
        if not idx:
            counts.append(0)
            continue
        r0 = sum(rows[k][: idx[0]])
        r1 = r0 + sum(rows[k][idx[0]: idx[-1] + 1])
        args = (px[r0:r1], grid[idx[0]: idx[-1] + 1] if grid is not None else None)
        if used is leaves:
            out = tower(*args)
        else:
            with _swapped(trainable, used):
                out = tower(*args)
        local.append(out.to(dtype))
        counts.append(int(out.shape[0]))
    width = int(local[0].shape[-1]) if local else 0
    device = inputs[0][0].device
    meta = torch.tensor([*counts, width], dtype=torch.long, device=device)
    metas = [torch.empty_like(meta) for _ in range(split.size)]
    dist.all_gather(metas, meta, group=split.group)
    table = torch.stack(metas).tolist()  # [rank][kind counts..., width]
    width = max(row[-1] for row in table)
    if local:
        block = torch.cat(local)
    else:
        block = torch.zeros((0, width), dtype=dtype, device=device)
        if differentiable:  # same backward collectives as the ranks that ran the tower
            block = block + sum(p.sum() for p in used) * 0.0
    lengths = [sum(row[:-1]) for row in table]
    gathered = _GatherRows.apply(block, lengths, split.rank, split.group, split.cp_group)
    # gathered = [rank0: kind0 rows, kind1 rows, ...; rank1: ...] -> per kind, rank order
    pieces: list[list[torch.Tensor]] = [[] for _ in inputs]
    offset = 0
    for row in table:
        for k, n in enumerate(row[:-1]):
            pieces[k].append(gathered[offset: offset + n])
            offset += n
    return [torch.cat(p) for p in pieces]


class SplitTower(nn.Module):
    """A callable with the tower's signature (``(pixels, grid) -> features``) that divides each
    call over ``split``; for families with their own ``VisionSpec.merge``. Holds the tower and
    its trainable-parameter list by reference (not as submodules: nothing is listed twice)."""

    def __init__(self, tower: nn.Module, split: VisionSplit,
                 trainable: Sequence[TrainableParam] | None = None) -> None:
        super().__init__()
        object.__setattr__(self, "_tower", tower)
        self.split = split
        self.trainable = trainable

    def forward(self, pixel_values: torch.Tensor, grid: torch.Tensor | None = None
                ) -> torch.Tensor:
        return split_tower_outputs(self._tower, [(pixel_values, grid)], self.split,
                                   self.trainable)[0]
