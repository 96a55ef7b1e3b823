"""HF <-> sharded Megatron-Core model, streaming, each rank touching only what it owns.

Load: every rank walks its own parameters, finds the mapping for each, and reads just its
TP/EP slice from the safetensors files straight into the parameter (``Mapping.load_into``,
``SafetensorsReader.read_into``). Nothing is broadcast, so loading scales with the ranks, and
nothing but the model's own parameters is allocated (one slice-sized buffer when the file's
dtype differs from the model's).

Export: every rank computes, without data, what it will write: for each parameter, the HF
tensors it makes (names, shapes, dtypes) and this rank's pieces of them (``Mapping.shard_to_hf``
on a meta tensor: a row block, a column block, a whole replicated tensor). The lists are
exchanged as metadata, and every rank lays out the same files from them: tensors in natural
name order, so a TP2 x PP2 export writes the very bytes a TP1 export writes. Rank 0 creates each
file (header written, size allocated); then every rank ``pwrite``s its own pieces at their
offsets, in parallel, straight from its shards: nothing is gathered. A mapping that cannot give
pieces (Qwen3-VL-MoE's fused experts) has its parameter gathered onto one writer of its group,
which writes the whole tensors at their offsets. The tied-embedding and "which replica speaks"
rules are :mod:`mvlm.convert.stream`'s.
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from mvlm.convert.direct_io import BlockWriter
from mvlm.convert.hf_io import (
    CheckpointError,
    SafetensorsReader,
    Spec,
    TensorLoc,
    create_planned_file,
    open_hf_reader,
    plan_files,
    write_index,
    write_piece,
)
from mvlm.convert.mapping import Mapping, Piece, ShardCtx, ShardShapeError, find_mapping
from mvlm.convert.publish import fault_point
from mvlm.convert.stream import full_shape, participates, shard_group, skip_on_export
from mvlm.models.vlm import ModelBundle

log = logging.getLogger(__name__)

_LAYER_RX = re.compile(r"^decoder\.layers\.(\d+)\.")
_EXPERT_RX = re.compile(r"(\.mlp\.experts\.local_experts\.)(\d+)(\.)")
_TE_EXPERT_RX = re.compile(r"(\.mlp\.experts\.linear_fc\d\.weight)(\d+)$")


@dataclass
class ParamEntry:
    local_name: str
    global_name: str
    param: torch.nn.Parameter
    mapping: Mapping
    idx: dict[str, str]


def _strip(name: str) -> str:
    return name[len("language_model."):] if name.startswith("language_model.") else name


def global_param_name(local: str, layer_offset: int, expert_offset: int) -> str:
    """Local (this stage / this EP rank) Megatron name -> global name used by the tables."""
    name = _strip(local)
    m = _LAYER_RX.match(name)
    if m:
        name = f"decoder.layers.{int(m.group(1)) + layer_offset}." + name[m.end():]
    name = _EXPERT_RX.sub(lambda mm: f"{mm.group(1)}{int(mm.group(2)) + expert_offset}"
                          f"{mm.group(3)}", name)
    name = _TE_EXPERT_RX.sub(lambda mm: f"{mm.group(1)}{int(mm.group(2)) + expert_offset}",
                             name)
    return name


def param_entries(bundle: ModelBundle) -> list[ParamEntry]:
    """This rank's parameters in a fixed order, each with its mapping; errors list gaps."""
    table = bundle.family.mappings(bundle.hf_config, bundle.arch)
    n_exp = bundle.arch.num_experts or 0
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    ep = parallel_state.get_expert_model_parallel_world_size()
    expert_offset = ep_rank * (n_exp // ep) if n_exp else 0
    out: list[ParamEntry] = []
    for vp, model in enumerate(bundle.models):
        vp_stage = vp if len(bundle.models) > 1 else None
        offset = get_transformer_layer_offset(bundle.config, vp_stage=vp_stage)
        for lname, p in model.named_parameters():
            if lname.startswith("mvlm_adapters."):  # mvlm.tuners: adapters export via peft_io
                continue
            gname = global_param_name(lname, offset, expert_offset)
            try:
                m, idx = find_mapping(table, gname)
            except KeyError:
                raise KeyError(f"{bundle.family.name}: no weight mapping for Megatron parameter "
                               f"{gname!r} (local {lname!r}); the family's table is "
                               "incomplete") from None
            out.append(ParamEntry(lname, gname, p, m, idx))
    return out


def shard_ctx(bundle: ModelBundle, m: Mapping) -> ShardCtx:
    if m.expert:
        rank = parallel_state.get_expert_tensor_parallel_rank()
        size = parallel_state.get_expert_tensor_parallel_world_size()
    else:
        rank = parallel_state.get_tensor_model_parallel_rank()
        size = parallel_state.get_tensor_model_parallel_world_size()
    a = bundle.arch
    return ShardCtx(tp_rank=rank, tp_size=size, vocab_size=a.vocab_size,
                    vocab_padded=bundle.vocab_padded, num_heads=a.num_heads,
                    num_kv_heads=a.num_kv_heads, head_dim=a.head_dim)


def _name_group(name: str) -> str:
    """The prefix a tensor name is grouped under in error messages: up to its first numeric
    component (``model.layers.*``), else its first two components."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[:i]) + ".*"
    return ".".join(parts[:2]) + (".*" if len(parts) > 2 else "")


def summarize_names(names: list[str] | set[str], per_group: int = 3, max_groups: int = 10
                    ) -> str:
    """``N: group.* (k: a, b, c, ...); ...``: every name counted, grouped by prefix, the first
    few of each group spelled out, so that a list of thousands of keys stays readable."""
    groups: dict[str, list[str]] = {}
    for n in sorted(names):
        groups.setdefault(_name_group(n), []).append(n)
    parts = []
    for g, members in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:max_groups]:
        shown = ", ".join(members[:per_group]) + (", ..." if len(members) > per_group else "")
        parts.append(f"{g} ({len(members)}: {shown})")
    more = f"; and {len(groups) - max_groups} more groups" if len(groups) > max_groups else ""
    return f"{len(names)}: " + "; ".join(parts) + more


def _check_keys(bundle: ModelBundle, reader: SafetensorsReader, hf_dir: str | Path,
                entries: list[ParamEntry], check_coverage: bool) -> None:
    """Refuse, before any tensor is read, a checkpoint that lacks tensors this model needs or
    (``check_coverage``: over all ranks) holds tensors no rank loads, naming all of them: a
    config of one family over another family's weights, or weights without a tower, shows up
    here as one grouped list instead of the first missing name."""
    needed = {n for e in entries for n in e.mapping.hf_names(e.idx)}
    missing = {n for n in needed if n not in reader}
    # the first gap in parameter order, with the Megatron parameter that needs it
    first = next(((n, e.global_name) for e in entries for n in e.mapping.hf_names(e.idx)
                  if n not in reader), None)
    unexpected: set[str] = set()
    if check_coverage:
        mine = (missing, {reader.disk_name(n) for n in needed - missing}, first)
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        missing = set().union(*(m for m, _, _ in everyone))
        unexpected = set(reader.keys()) - set().union(*(u for _, u, _ in everyone))
        first = next((f for _, _, f in everyone if f is not None), None)
        if bundle.arch.tie_word_embeddings:
            # HF ignores a stored lm_head of a tied model (it re-ties to the embedding); so do we.
            unexpected = {n for n in unexpected if not n.endswith("lm_head.weight")}
    if not missing and not unexpected:
        return
    msg = [f"{hf_dir}: the weights do not match the {bundle.family.name} model that "
           f"config.json describes (is this a {bundle.family.name} checkpoint? a config of "
           "one family over another's weights, or weights without a tower, look like this)"]
    if missing:
        msg.append(f"missing tensors {summarize_names(missing)} (looked for the hub layout "
                   "and transformers' module-tree layout, e.g. model.layers.* or "
                   "model.language_model.layers.*)")
        if first is not None:
            msg.append(f"the first, {first[0]!r}, is needed for {first[1]}")
    if unexpected:
        msg.append(f"unexpected tensors, loaded into no rank {summarize_names(unexpected)}")
    raise CheckpointError("\n".join(msg))


@torch.no_grad()
def load_hf_weights(bundle: ModelBundle, hf_dir: str | Path,
                    check_coverage: bool = True) -> None:
    """Fill this rank's shards from an HF safetensors directory (no intermediate files).

    Every missing and unexpected tensor is refused first (:func:`_check_keys`); with
    ``check_coverage`` that check is collective (every rank must call)."""
    reader = open_hf_reader(hf_dir)  # a foreign layout (original InternVL) is adapted
    entries = param_entries(bundle)
    _check_keys(bundle, reader, hf_dir, entries, check_coverage)
    for e in entries:
        ctx = shard_ctx(bundle, e.mapping)
        names = e.mapping.hf_names(e.idx)
        try:  # straight into the parameter: no full-size temporary, no second copy
            e.mapping.load_into(reader, e.idx, ctx, e.param.data)
        except ShardShapeError as err:
            raise CheckpointError(
                f"{e.global_name}: HF tensors {names} give shape {err.shape} but the "
                f"Megatron shard is {tuple(e.param.shape)}; config.json does not match the "
                "weights") from None


@dataclass
class ExportStats:
    """What this rank's last :func:`export_hf_weights` wrote, in bytes of tensor data: from its
    own shards (``direct``), as the writer of an entry whose mapping gives no pieces
    (``gathered``), and of either, what was taken from an input file rather than memory
    (``kernel``); ``direct_io`` counts file bytes (tensor data and header blocks) this rank
    wrote around the page cache (:mod:`mvlm.convert.direct_io`), ``swapped`` the bytes of its
    pieces that it wrote as rows after swapping column blocks with its group. For tests (a TP
    export that silently fell back to gathering would still be exact) and the benchmark."""

    direct_bytes: int = 0
    gathered_bytes: int = 0
    kernel_bytes: int = 0
    direct_io_bytes: int = 0
    swapped_bytes: int = 0
    pieces: int = 0


_LAST_EXPORT = ExportStats()


def last_export_stats() -> ExportStats:
    """This rank's numbers of its last :func:`export_hf_weights` (zeros before the first)."""
    return _LAST_EXPORT


@dataclass
class _Job:
    """One participating entry's export on this rank: its whole HF tensors (``specs``, the same
    on every member of its group), whether its mapping gives pieces (``direct``; else the entry
    is gathered onto ``writer``), and the pieces this rank writes, as (name, dim, start, shape)."""

    entry: ParamEntry
    ctx: ShardCtx
    specs: list[Spec]
    direct: bool
    writer: int = 0
    pieces: list[tuple[str, int, int, list[int]]] = field(default_factory=list)
    # pieces that leave as row blocks after a swap of column blocks over the group; see
    # :func:`_rows_instead_of_columns` (index in ``pieces`` -> rows of each group rank)
    swaps: dict[int, list[int]] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(torch.Size(s).numel() * torch.empty((), dtype=d).element_size()
                   for _, d, s in self.specs)

    @property
    def split(self) -> bool:
        """Written by every member of its group, a block each."""
        return self.direct and self.entry.mapping.split_dim is not None


def _writers(jobs: list[_Job]) -> list[int]:
    """The TP (expert-TP) group rank that writes each whole entry (replicated, or gathered).

    A split entry with pieces is written by every member, 1/size of its bytes each; the whole
    entries then go, largest first, each to the member given the fewest bytes so far, so that
    every member writes about 1/size of the bytes in parallel with the others. The members of
    a group see the same entries with the same shapes, so all compute the same answer."""
    loads: dict[bool, list[int]] = {}
    whole = []
    for i, j in enumerate(jobs):
        load = loads.setdefault(j.entry.mapping.expert, [0] * j.ctx.tp_size)
        if j.split:
            for r in range(len(load)):
                load[r] += j.nbytes // len(load)
        else:
            whole.append(i)
    out = [0] * len(jobs)
    for i in sorted(whole, key=lambda i: -jobs[i].nbytes):  # ties in entry order
        load = loads[jobs[i].entry.mapping.expert]
        out[i] = min(range(len(load)), key=load.__getitem__)
        load[out[i]] += jobs[i].nbytes
    return out


def _plan_jobs(bundle: ModelBundle, entries: list[ParamEntry], dtype: torch.dtype | None
               ) -> list[_Job]:
    """Every participating entry's job, from shapes only: the mapping's pieces are computed on
    a meta tensor shaped like this rank's shard."""
    jobs = []
    for e in entries:
        ctx = shard_ctx(bundle, e.mapping)
        specs = [(n, dtype or e.param.dtype, list(s))
                 for n, s in e.mapping.hf_shapes(full_shape(e, ctx), e.idx, ctx)]
        meta = torch.empty(e.param.shape, dtype=e.param.dtype, device="meta")
        pieces = e.mapping.shard_to_hf(meta, e.idx, ctx)
        jobs.append(_Job(e, ctx, specs, pieces is not None,
                         pieces=[(n, d, s, list(t.shape)) for n, d, s, t in pieces or []]))
    for j, w in zip(jobs, _writers(jobs), strict=True):
        j.writer = w
        if not j.split and j.ctx.tp_rank != w:
            j.pieces = []  # whole entries: the writer alone
        elif not j.direct:
            j.pieces = [(n, 0, 0, s) for n, _, s in j.specs]
        else:
            _rows_instead_of_columns(j)
    return jobs


def _rows_instead_of_columns(j: _Job) -> None:
    """Plan the column blocks of a row-parallel weight as row blocks.

    A weight split along its columns (``[out, in]`` with ``in`` split: attention's output and
    the MLP's down projection) gives each rank one narrow run per row: at TP2 on the bench
    checkpoint ~31,000 small writes per rank into pages the other rank writes too (1.6 s of
    the export). Instead the ranks swap blocks (one ``all_to_all`` over the group, 1/size of
    the shard to each peer, nothing gathered): rank r sends rows block s of its columns to
    rank s and receives its own rows of every column block, then writes whole rows, one
    contiguous range. Only for 2-D pieces that are the group's equal column blocks in rank
    order with at least one row per rank: every member sees the same shapes and decides alike.
    """
    full = {n: list(s) for n, _, s in j.specs}
    size, rank = j.ctx.tp_size, j.ctx.tp_rank
    if size == 1:
        return
    for i, (name, dim, start, shape) in enumerate(j.pieces):
        whole = full.get(name)
        if dim != 1 or whole is None or len(shape) != 2 or shape[0] != whole[0] \
                or shape[1] * size != whole[1] or start != rank * shape[1] or whole[0] < size:
            continue
        rows = [whole[0] // size + (r < whole[0] % size) for r in range(size)]
        j.swaps[i] = rows
        j.pieces[i] = (name, 0, sum(rows[:rank]), [rows[rank], whole[1]])


def _swap_to_rows(j: _Job, t: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """This rank's rows of the whole tensor, from every rank's column block ``t`` (see
    :func:`_rows_instead_of_columns`): one ``all_to_all`` over the group, one copy."""
    size, rank = j.ctx.tp_size, j.ctx.tp_rank
    t = t.contiguous()
    got = torch.empty(rows[rank] * size, t.shape[1], dtype=t.dtype)
    dist.all_to_all_single(got, t, [rows[rank]] * size, rows, group=shard_group(j.entry.mapping))
    # got = [block of rank 0; block of rank 1; ...], each [my rows, width]: side by side
    return got.view(size, rows[rank], t.shape[1]).transpose(0, 1).reshape(rows[rank], -1)


def _order_key(name: str) -> tuple:
    """Natural order of HF names (``layers.2`` before ``layers.10``): the order tensors are laid
    out in the files, the same whatever the parallel layout that exports them."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))


def _check_tiling(pieces_by_rank: list[list[tuple[str, int, int, list[int]]]],
                  locs: dict[str, TensorLoc]) -> None:
    """Raise unless the pieces of all ranks cover every planned tensor exactly once: the files
    are sized before any data moves, so a gap would stay zeros and an overlap would be written
    twice; both are refused here, before the first byte, on every rank alike."""
    by_name: dict[str, list[tuple[int, int, list[int], int]]] = {}
    for rank, pieces in enumerate(pieces_by_rank):
        for name, dim, start, shape in pieces:
            if name not in locs:
                raise RuntimeError(f"rank {rank} has a piece of {name}, which is not planned")
            by_name.setdefault(name, []).append((dim, start, shape, rank))
    for name, loc in locs.items():
        got = sorted(by_name.get(name, []), key=lambda p: p[1])
        if not _tiles(got, list(loc.shape)):
            raise RuntimeError(f"the export's pieces do not tile {name} {list(loc.shape)} "
                               f"exactly once: (dim, start, shape, rank) {got}")


def _tiles(got: list[tuple[int, int, list[int], int]], full: list[int]) -> bool:
    """Whether the (dim, start, shape, rank) pieces, sorted by start, are the whole tensor, or
    blocks along one dim that follow each other from 0 to its end."""
    if len(got) == 1 and got[0][1] == 0 and list(got[0][2]) == full:
        return True
    if not got or len({p[0] for p in got}) != 1 or not 0 <= got[0][0] < len(full):
        return False
    dim, at = got[0][0], 0
    for _, start, shape, _ in got:
        if start != at or len(shape) != len(full) or \
                list(shape[:dim]) + list(shape[dim + 1:]) != full[:dim] + full[dim + 1:]:
            return False
        at += shape[dim]
    return at == full[dim]


def _gather_to(e: ParamEntry, ctx: ShardCtx, writer: int) -> torch.Tensor | None:
    """The whole Megatron tensor on group rank ``writer`` (None elsewhere).

    Point to point instead of ``all_gather`` (what :mod:`mvlm.convert.stream` does for the
    receivers that all need the tensor): the writer allocates the full tensor once and receives
    each shard into its place (row shards land directly; column shards go through one
    shard-sized buffer); the other ranks send their shard and allocate nothing. Gloo's
    all_gather would hold the shards, a flat receive buffer and the concatenation on every
    rank: 3x the tensor, which at TP2 broke the 2x-largest-tensor memory bound."""
    shard = e.param.detach()
    dim = e.mapping.split_dim
    if dim is None or ctx.tp_size == 1:
        return shard if ctx.tp_rank == writer else None
    group = shard_group(e.mapping)
    ranks = dist.get_process_group_ranks(group)
    if ctx.tp_rank != writer:
        dist.send(shard.contiguous(), dst=ranks[writer], group=group)
        return None
    full = torch.empty(full_shape(e, ctx), dtype=shard.dtype)
    per = shard.shape[dim]
    buf = None
    for r in range(ctx.tp_size):
        dst = full.narrow(dim, r * per, per)
        if r == ctx.tp_rank:
            dst.copy_(shard)
        elif dst.is_contiguous():
            dist.recv(dst, src=ranks[r], group=group)
        else:
            buf = torch.empty_like(shard, memory_format=torch.contiguous_format) \
                if buf is None else buf
            dist.recv(buf, src=ranks[r], group=group)
            dst.copy_(buf)
    return full


def _job_pieces(j: _Job) -> Iterator[Piece]:
    """This rank's pieces of ``j`` (none on a member that writes nothing), one at a time. A
    gathered entry's group gathers here: every member must exhaust this generator."""
    e = j.entry
    if j.direct:
        pieces = e.mapping.shard_to_hf(e.param.detach(), e.idx, j.ctx) if j.pieces else []
    else:
        full = _gather_to(e, j.ctx, j.writer)
        pieces = [] if full is None else [(n, 0, 0, t)
                                          for n, t in e.mapping.to_hf(full, e.idx, j.ctx)]
        del full
    while pieces:
        yield pieces.pop(0)


def _write_job(j: _Job, out: BlockWriter, locs: dict[str, TensorLoc],
               dtype: torch.dtype | None, stats: ExportStats) -> None:
    """Write this rank's pieces of ``j`` at their planned offsets of the open file ``out``."""
    planned = iter(j.pieces)
    for i, (name, dim, start, t) in enumerate(_job_pieces(j)):
        t = t if dtype is None else t.to(dtype)
        if i in j.swaps:
            t, dim, start = _swap_to_rows(j, t, j.swaps[i]), 0, j.pieces[i][2]
            stats.swapped_bytes += t.numel() * t.element_size()
        want = next(planned, None)
        if want != (name, dim, start, list(t.shape)):
            raise RuntimeError(f"{j.entry.global_name}: piece {name} dim {dim} start {start} "
                               f"{list(t.shape)} was planned as {want}")
        stats.kernel_bytes += write_piece(out, locs[name], dim, start, t)
        nbytes = t.numel() * t.element_size()
        if j.direct:
            stats.direct_bytes += nbytes
        else:
            stats.gathered_bytes += nbytes
        stats.pieces += 1
        del t
    if next(planned, None) is not None:
        raise RuntimeError(f"{j.entry.global_name}: fewer pieces than planned")


@torch.no_grad()
def export_hf_weights(bundle: ModelBundle, out_dir: Path, dtype: torch.dtype | None = None,
                      max_shard_bytes: int = 5 * 2**30) -> dict[str, str]:
    """Write HF safetensors shards + index into ``out_dir`` (shared by all ranks). Returns the
    weight map. Collective: every rank must call it.

    1. Plan, from shapes only: every rank lists its jobs and their pieces; the whole tensors
       (from each group's first member) and every rank's pieces are exchanged as metadata; all
       ranks lay the same files out alike (:func:`mvlm.convert.hf_io.plan_files`, tensors in
       natural name order, so the files do not depend on the layout that writes them) and check
       that the pieces tile every tensor (:func:`_check_tiling`).
    2. Per file, in order: rank 0 creates it (header written, size allocated); barrier; every
       rank writes its pieces at their offsets; barrier. A file is complete before the next
       one exists (the ``mid_write`` fault point's promise)."""
    entries = [e for e in param_entries(bundle)
               if not skip_on_export(bundle, e) and participates(e.mapping)]
    jobs = _plan_jobs(bundle, entries, dtype)
    mine = ([j.specs for j in jobs if j.ctx.tp_rank == 0 and j.specs],
            [p for j in jobs for p in j.pieces])
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    groups = sorted((g for specs, _ in everyone for g in specs), key=lambda g: _order_key(g[0][0]))
    files, locs = plan_files(groups, max_shard_bytes)
    _check_tiling([p for _, p in everyone], locs)
    by_file: dict[str, list[_Job]] = {}
    for j in jobs:
        if j.specs:
            by_file.setdefault(locs[j.specs[0][0]].file, []).append(j)
    global _LAST_EXPORT
    _LAST_EXPORT = stats = ExportStats()
    for f in files:
        path = out_dir / f.name
        if dist.get_rank() == 0:
            create_planned_file(path, f)
        dist.barrier()
        if by_file.get(f.name):
            out = BlockWriter(path, size=f.size)
            try:
                for j in by_file[f.name]:
                    _write_job(j, out, locs, dtype, stats)
            finally:
                out.close()
            stats.direct_io_bytes += out.direct_bytes
        dist.barrier()
        fault_point("mid_write", path)  # tests: a kill lands with one file complete
    weight_map = {name: loc.file for name, loc in locs.items()}
    if dist.get_rank() == 0 and len(files) > 1:
        write_index(out_dir, weight_map, sum(f.size - len(f.head) for f in files))
    dist.barrier()
    # A mapping whose HF tensor spans parameters of several ranks (Qwen3-VL-MoE's fused experts)
    # writes per-parameter pieces above; its post_export hook joins them once all are on disk.
    table = bundle.family.mappings(bundle.hf_config, bundle.arch)
    for hook in dict.fromkeys(m.post_export for m in table if getattr(m, "post_export", None)):
        box = [hook(out_dir, weight_map) if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box, src=0)
        weight_map = box[0]
    return weight_map


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
