"""Stream a sharded Megatron-Core model as (HF name, full HF tensor) pairs in bounded memory.

This is the one place where tensor-parallel shards are gathered back into whole tensors: the HF
export (file writer), the PEFT adapter export and weight sync to an inference engine all consume
it, so the gather, the tied-embedding rule and the "which replica speaks" rule live here once.

How it walks: every rank lists its own parameters in a fixed order (``param_entries``; the ranks
of one TP / expert-TP group hold the same parameters in the same order, so their collectives
always line up: a rank that will receive nothing still joins each gather). One parameter at a
time is all-gathered over its group, turned into HF tensors by the family mapping's ``to_hf``,
yielded, and dropped before the next one is gathered. Peak extra memory per rank: the shards of
one parameter plus its concatenation (~2x one full tensor); the caller must not keep what it is
given if it wants that bound (copy it, write it, send it, then let go).

Who receives (``receivers``):

* ``"group_first"`` (default): the first rank of each TP (expert-TP for expert weights) group of
  one data-parallel / context-parallel replica, i.e. one rank per pipeline stage (and per expert
  rank). Every HF tensor is yielded exactly once across the whole job; stages work in parallel
  and nothing crosses pipeline stages. This is what file writing wants.
* ``"owners"``: every rank that holds a shard of the parameter (all TP ranks of every
  data-parallel replica) gets the full tensor: each rank can then push its own part of the model
  to a co-located inference engine. A tensor is yielded once per owner.
* ``"rank0"``: global rank 0 gets every tensor: the first rank of each group sends its tensors to
  rank 0 point-to-point, in one global order all ranks agree on (planned from metadata first).
  For an engine that is fed from one process.

Every rank must exhaust the generator (a ``for`` loop over it), also where it yields nothing.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from megatron.core import parallel_state

Receivers = Literal["group_first", "owners", "rank0"]
RECEIVERS: tuple[str, ...] = ("group_first", "owners", "rank0")


@dataclass
class StreamStats:
    """What the stream itself held at once, in elements (shards + gathered + converted copies
    that are not views of the model's own parameter). Lets tests and callers check the bound."""

    peak_numel: int = 0
    largest_full_numel: int = 0  # largest whole (gathered) Megatron parameter streamed here
    tensors: int = 0

    def hold(self, numel: int) -> None:
        self.peak_numel = max(self.peak_numel, numel)


def gather_tp(t: torch.Tensor, dim: int | None, size: int, group) -> tuple[torch.Tensor, int]:
    """The whole tensor from its ``size`` shards along ``dim`` over ``group`` (collective for the
    group's ranks). Returns (tensor, elements allocated at the peak: shards + concatenation).
    Replicated (dim None) or TP1 tensors come back as they are, without a copy."""
    t = t.detach()
    if dim is None or size == 1:
        return t, 0
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous(), group=group)
    full = torch.cat(parts, dim=dim)
    return full, 2 * full.numel()


def participates(m) -> bool:
    """One data-parallel (and CP) replica of each parameter speaks for it.

    Public because the HF export (:mod:`mvlm.convert.bridge`) and the colocated weight sync
    (:mod:`mvlm.rl.rollout.colocate`) must pick the same replica as this stream."""
    if m.expert:
        return parallel_state.get_expert_data_parallel_rank() == 0
    return (parallel_state.get_data_parallel_rank() == 0
            and parallel_state.get_context_parallel_rank() == 0)


def shard_group(m):
    """The process group a parameter with mapping ``m`` is sharded over: expert-TP for expert
    weights, TP otherwise. Public for the same reason as :func:`participates`."""
    return (parallel_state.get_expert_tensor_parallel_group() if m.expert
            else parallel_state.get_tensor_model_parallel_group())


def skip_on_export(bundle, e) -> bool:
    """Tied embeddings: HF stores only embed_tokens; the last stage's output copy is dropped."""
    return bundle.arch.tie_word_embeddings and e.global_name == "output_layer.weight"


def full_shape(e, ctx) -> list[int]:
    shape = list(e.param.shape)
    if e.mapping.split_dim is not None:
        shape[e.mapping.split_dim] *= ctx.tp_size
    return shape


def _local_stream(bundle, entries, dtype, first_only: bool, stats: StreamStats
                  ) -> Iterator[tuple[str, torch.Tensor]]:
    """This rank's part of the walk: gather each of its participating parameters over its group
    and yield the HF tensors (on the group's first rank only when ``first_only``)."""
    from mvlm.convert.bridge import shard_ctx

    for e in entries:
        if first_only and not participates(e.mapping):
            continue
        convert = not first_only or shard_ctx(bundle, e.mapping).tp_rank == 0
        hf = gather_entry(bundle, e, dtype, convert, stats)
        while hf:
            stats.tensors += 1
            yield hf.pop(0)


def gather_entry(bundle, e, dtype, convert: bool, stats: StreamStats
                 ) -> list[tuple[str, torch.Tensor]]:
    """Gather one parameter over its group; its HF tensors where ``convert`` (else []).
    Collective over :func:`shard_group`. Public: the colocated weight sync drives the rank-0
    walk itself (one parameter per step) and gathers with this."""
    from mvlm.convert.bridge import shard_ctx

    ctx = shard_ctx(bundle, e.mapping)
    full, held = gather_tp(e.param, e.mapping.split_dim, ctx.tp_size, shard_group(e.mapping))
    stats.hold(held)
    stats.largest_full_numel = max(stats.largest_full_numel, full.numel())
    if not convert:
        return []
    hf = e.mapping.to_hf(full, e.idx, ctx)
    if dtype is not None:
        hf = [(n, t.to(dtype)) for n, t in hf]
    base = full.untyped_storage().data_ptr()
    held = full.numel() if held else 0  # the shards are gone once to_hf runs
    held += sum(t.numel() for _, t in hf if t.untyped_storage().data_ptr() != base)
    stats.hold(held)
    return hf


def rank0_plan(bundle, entries, dtype) -> list[tuple[int, str, list]]:
    """The global order of the walk: (leader rank, Megatron global name, [(hf name, dtype,
    shape)]) for every parameter, leaders in rank order, each leader's in its own order.
    Metadata only, exchanged by all ranks, so every rank follows the same list. Public: the
    colocated weight sync walks this same plan."""
    from mvlm.convert.bridge import shard_ctx

    mine = []
    for e in entries:
        ctx = shard_ctx(bundle, e.mapping)
        if not participates(e.mapping) or ctx.tp_rank != 0:
            continue
        specs = [(n, dtype or e.param.dtype, s)
                 for n, s in e.mapping.hf_shapes(full_shape(e, ctx), e.idx, ctx)]
        mine.append((e.global_name, specs))
    plans: list = [None] * dist.get_world_size()
    dist.all_gather_object(plans, mine)
    return [(r, name, specs) for r, plan in enumerate(plans) for name, specs in plan]


def entries_by_leader(entries) -> dict[tuple[int, str], object]:
    """This rank's participating entries keyed as :func:`rank0_plan` names its steps: (global
    rank of the first member of the parameter's shard group, Megatron global name). Shared
    with the colocated weight sync, which walks the same plan."""
    mine: dict[tuple[int, str], object] = {}
    for e in entries:
        if participates(e.mapping):
            leader = dist.get_process_group_ranks(shard_group(e.mapping))[0]
            mine[(leader, e.global_name)] = e
    return mine


def check_planned(name: str, hf: list[tuple[str, torch.Tensor]], specs: list) -> None:
    """Raise unless the HF tensors ``hf`` streamed for ``name`` match the plan's ``specs``
    (names, dtypes, shapes): the receivers allocate from the plan alone."""
    got = [(n, t.dtype, list(t.shape)) for n, t in hf]
    want = [(n, d, list(s)) for n, d, s in specs]
    if got != want:
        raise RuntimeError(f"rank {dist.get_rank()}: {name} streamed as {got} but planned as "
                           f"{want}: the mapping's hf_shapes disagrees with to_hf")


def _rank0_stream(bundle, entries, dtype, stats: StreamStats
                  ) -> Iterator[tuple[str, torch.Tensor]]:
    """Every rank walks the global plan; at each step the leader's group gathers (its members
    recognise the step by the leader's rank and the parameter's name), the leader sends the HF
    tensors to rank 0 (or yields them, being rank 0). One total order of blocking operations
    that every rank follows, so no rank waits on one that waits on it."""
    me = dist.get_rank()
    mine = entries_by_leader(entries)
    for leader, name, specs in rank0_plan(bundle, entries, dtype):
        e = mine.get((leader, name))
        if e is not None:
            hf = gather_entry(bundle, e, dtype, me == leader, stats)
            if me == leader:
                check_planned(name, hf, specs)
                if me == 0:
                    while hf:
                        stats.tensors += 1
                        yield hf.pop(0)
                else:
                    for _, t in hf:
                        dist.send(t.contiguous(), dst=0)
                del hf
        if me == 0 and leader != 0:
            for n, dt, shape in specs:
                buf = torch.empty(shape, dtype=dt)
                stats.hold(buf.numel())
                dist.recv(buf, src=leader)
                stats.tensors += 1
                yield n, buf
                del buf


@torch.no_grad()
def iter_hf_tensors(bundle, *, receivers: Receivers = "group_first",
                    dtype: torch.dtype | None = None,
                    select: Callable | None = None, entries: list | None = None,
                    stats: StreamStats | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, tensor)`` for the model's weights, one parameter gathered at a time.

    Collective: every rank must iterate it to the end (see the module docstring for
    ``receivers``). ``dtype`` casts what is yielded (None: the parameter's dtype). ``select``
    keeps only the ``ParamEntry``s it accepts (e.g. trainable ones for PEFT modules_to_save);
    it must give the same answer on every rank of a TP group. ``entries`` overrides the walk
    (default: ``param_entries(bundle)``); the tied output copy is always left out, as in HF.
    Yielded tensors may be views of the model's own parameters (TP1): copy before modifying."""
    if receivers not in RECEIVERS:
        raise ValueError(f"iter_hf_tensors: receivers={receivers!r}; choose one of {RECEIVERS}")
    from mvlm.convert.bridge import param_entries

    stats = stats if stats is not None else StreamStats()
    ents = [e for e in (entries if entries is not None else param_entries(bundle))
            if not skip_on_export(bundle, e) and (select is None or select(e))]
    if receivers == "rank0":
        yield from _rank0_stream(bundle, ents, dtype, stats)
    else:
        yield from _local_stream(bundle, ents, dtype, receivers == "group_first", stats)
