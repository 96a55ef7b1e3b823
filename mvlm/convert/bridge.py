"""HF <-> sharded Megatron-Core model, streaming, each rank touching only what it owns.

Load: every rank walks its own parameters, finds the mapping for each, and reads just its
TP/EP slice from the safetensors files straight into the parameter (``Mapping.load_into``,
``SafetensorsReader.read_into``). Nothing is broadcast, so loading scales with the ranks, and
nothing but the model's own parameters is allocated (one slice-sized buffer when the file's
dtype differs from the model's).

Export: every rank computes, without data, the list of HF tensors it will write (names, shapes,
dtypes); the lists are exchanged as metadata so that file names and the index are known before
any tensor moves. Then one parameter at a time is gathered onto its writer, a rank of its (TP or
expert-TP) group chosen round-robin, which appends the converted tensors to its own safetensors
file. All ranks of a TP group write (a share each), as do pipeline stages and expert ranks, in
parallel; nothing is funnelled through rank 0. The tied-embedding and "which replica speaks"
rules are :mod:`mvlm.convert.stream`'s.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from mvlm.convert.hf_io import (
    CheckpointError,
    SafetensorsReader,
    StreamingSafetensorsWriter,
    write_index,
)
from mvlm.convert.mapping import Mapping, ShardCtx, ShardShapeError, find_mapping
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
    reader = SafetensorsReader(hf_dir)
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




def _writers(bundle: ModelBundle, entries: list[ParamEntry]) -> list[int]:
    """The TP (expert-TP) group rank that writes each entry, largest entries first, each to the
    member given the fewest bytes so far: every member writes about 1/size of the bytes, in
    parallel with the others (round-robin by count put both vocabulary tensors on one rank:
    1229 vs 287 MB at TP2 on the bench checkpoint). The members of a group see the same
    entries with the same shapes, so all compute the same answer."""
    sizes = []
    for e in entries:
        ctx = shard_ctx(bundle, e.mapping)
        sizes.append((torch.Size(full_shape(e, ctx)).numel() * e.param.element_size(),
                      ctx.tp_size))
    loads: dict[bool, list[int]] = {}
    out = [0] * len(entries)
    # largest first (ties in entry order), each to the least loaded member
    for i in sorted(range(len(entries)), key=lambda i: -sizes[i][0]):
        load = loads.setdefault(entries[i].mapping.expert, [0] * sizes[i][1])
        out[i] = min(range(len(load)), key=load.__getitem__)
        load[out[i]] += sizes[i][0]
    return out


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


def _writer_stream(bundle: ModelBundle, entries: list[ParamEntry], dtype: torch.dtype | None):
    """(HF name, tensor) for the entries this rank writes, in ``entries`` order. Every rank of
    every group walks the same list, so the sends and receives pair up in one order."""
    for e, w in zip(entries, _writers(bundle, entries), strict=True):
        if not participates(e.mapping):
            continue
        ctx = shard_ctx(bundle, e.mapping)
        full = _gather_to(e, ctx, w)
        if full is None:
            continue
        hf = e.mapping.to_hf(full, e.idx, ctx)
        del full
        while hf:
            name, t = hf.pop(0)
            yield name, (t if dtype is None else t.to(dtype))


@torch.no_grad()
def export_hf_weights(bundle: ModelBundle, out_dir: Path, dtype: torch.dtype | None = None,
                      max_shard_bytes: int = 5 * 2**30) -> dict[str, str]:
    """Write HF safetensors shards + index into ``out_dir`` (shared by all ranks). Returns the
    weight map. Collective: every rank must call it."""
    entries = [e for e in param_entries(bundle) if not skip_on_export(bundle, e)]
    # 1. Plan (metadata only).
    my_specs: list[tuple[str, torch.dtype, list[int]]] = []
    for e, w in zip(entries, _writers(bundle, entries), strict=True):
        if not participates(e.mapping):
            continue
        ctx = shard_ctx(bundle, e.mapping)
        if ctx.tp_rank != w:
            continue
        for name, shape in e.mapping.hf_shapes(full_shape(e, ctx), e.idx, ctx):
            my_specs.append((name, dtype or e.param.dtype, shape))
    world = dist.get_world_size()
    all_specs: list[list] = [None] * world  # type: ignore[list-item]
    dist.all_gather_object(all_specs, my_specs)
    files: list[tuple[int, list]] = []  # (writer rank, specs)
    seen: dict[str, int] = {}
    for rank, specs in enumerate(all_specs):
        cur: list = []
        size = 0
        for spec in specs:
            if spec[0] in seen:
                raise RuntimeError(f"{spec[0]} planned by ranks {seen[spec[0]]} and {rank}")
            seen[spec[0]] = rank
            nbytes = torch.Size(spec[2]).numel() * torch.empty((), dtype=spec[1]).element_size()
            if cur and size + nbytes > max_shard_bytes:
                files.append((rank, cur))
                cur, size = [], 0
            cur.append(spec)
            size += nbytes
        if cur:
            files.append((rank, cur))
    n = len(files)
    fname = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" if n > 1 else "model.safetensors"
             for i in range(n)]
    weight_map = {spec[0]: fname[i] for i, (_, specs) in enumerate(files) for spec in specs}
    my_files = [(fname[i], specs) for i, (r, specs) in enumerate(files)
                if r == dist.get_rank()]
    # 2. Stream: this rank writes exactly what it leads (group_first), in its plan's order.
    writer = None
    file_iter = iter(my_files)
    remaining = 0
    for name, tensor in _writer_stream(bundle, entries, dtype):
        if remaining == 0:
            if writer is not None:
                writer.close()
            f, specs = next(file_iter)
            writer = StreamingSafetensorsWriter(out_dir / f, specs)
            remaining = len(specs)
        writer.write(name, tensor)
        remaining -= 1
    if writer is not None:
        writer.close()
    if dist.get_rank() == 0:
        total = sum(torch.Size(s[2]).numel() * torch.empty((), dtype=s[1]).element_size()
                    for _, specs in files for s in specs)
        if n > 1:
            write_index(out_dir, weight_map, total)
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
