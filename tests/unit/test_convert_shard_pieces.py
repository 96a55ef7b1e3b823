"""Per-shard export (``Mapping.shard_to_hf``) and writing pieces in place (``hf_io.write_piece``).

A TP export no longer gathers a parameter before converting it: each rank writes, from its own
shard, the blocks of the HF tensors it holds. That is exact only if, for every mapping, the
pieces of all ranks put together are ``to_hf`` of the whole tensor, bit for bit. Shards are
made here as Megatron-Core makes them: a random whole Megatron tensor cut into TP equal blocks
along the mapping's split dimension (the padded vocabulary included; QKV's per-group interleave
and GatedMLP's [gate_r; up_r] are in the whole tensor's layout, so contiguous blocks are what a
rank holds). Then the file side: pieces written at their planned offsets (rows, column runs,
dtype conversion, kernel copies of mapped bytes) give the bytes of the streaming writer.
"""
from __future__ import annotations

import pytest
import torch

from mvlm.convert import file_maps
from mvlm.convert.direct_io import BlockWriter
from mvlm.convert.hf_io import (
    StreamingSafetensorsWriter,
    create_planned_file,
    plan_files,
    write_piece,
)
from mvlm.convert.mapping import (
    QKV,
    Column,
    GatedMLP,
    Replicated,
    Row,
    ShardCtx,
    VocabColumn,
    te_aliases,
)


def _ctx(rank: int, size: int, geo: dict) -> ShardCtx:
    return ShardCtx(tp_rank=rank, tp_size=size, **geo)


def _case(kind: str, tp: int, seed: int, dtype: torch.dtype):
    """(mapping, whole Megatron tensor, attention/vocab geometry) with random shapes."""
    g = torch.Generator().manual_seed(seed)

    def r(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    hidden = r(2, 7)
    geo = dict(vocab_size=1, vocab_padded=1, num_heads=1, num_kv_heads=1, head_dim=1)
    if kind == "column":
        m, shape = Column("x", "a"), [tp * r(1, 4), hidden]
    elif kind == "column_bias":
        m, shape = Column("x", "a"), [tp * r(1, 4)]
    elif kind == "row":
        m, shape = Row("x", "a"), [r(1, 5), tp * r(1, 4)]
    elif kind == "replicated":
        m, shape = Replicated("x", "a"), [r(1, 5), hidden]
    elif kind == "replicated_scalar":
        m, shape = Replicated("x", "a"), []
    elif kind == "vocab":
        # padded to a multiple of 8 * tp: the last rank(s) hold padding rows, some only padding
        padded = 8 * tp * r(1, 2)
        geo.update(vocab_size=r(padded - 8 * tp + 1, padded - 1), vocab_padded=padded)
        m, shape = VocabColumn("x", "a"), [padded, hidden]
    elif kind in ("qkv_gqa", "qkv_bias", "qkv_mha"):
        d, groups, hpg = r(1, 3), tp * r(1, 2), 1 if kind == "qkv_mha" else r(2, 3)
        geo.update(num_heads=groups * hpg, num_kv_heads=groups, head_dim=d)
        rows = groups * (hpg + 2) * d
        m, shape = QKV("x", "q", "k", "v"), [rows] if kind == "qkv_bias" else [rows, hidden]
    elif kind == "gated":
        m, shape = GatedMLP("x", "gate", "up"), [2 * tp * r(1, 4), hidden]
    else:
        raise ValueError(kind)
    full = (torch.randn(shape, generator=g) * 10).to(dtype)
    return m, full, geo


KINDS = ["column", "column_bias", "row", "replicated", "replicated_scalar", "vocab", "qkv_gqa",
         "qkv_bias", "qkv_mha", "gated"]


def _shards(m, full: torch.Tensor, tp: int) -> list[torch.Tensor]:
    if m.split_dim is None:
        return [full] * tp
    return [s.contiguous() for s in torch.chunk(full, tp, dim=m.split_dim)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("kind", KINDS)
def test_pieces_of_all_ranks_are_to_hf_of_the_whole(kind, tp, seed, dtype):
    m, full, geo = _case(kind, tp, seed, dtype)
    want = dict(m.to_hf(full, {}, _ctx(0, tp, geo)))
    by_name: dict[str, list] = {}
    for rank, shard in enumerate(_shards(m, full, tp)):
        pieces = m.shard_to_hf(shard, {}, _ctx(rank, tp, geo))
        assert pieces is not None, kind
        meta = m.shard_to_hf(torch.empty(shard.shape, dtype=dtype, device="meta"), {},
                             _ctx(rank, tp, geo))
        assert [(n, d, s, list(t.shape)) for n, d, s, t in meta] == \
            [(n, d, s, list(t.shape)) for n, d, s, t in pieces]  # the plan's view is exact
        for name, dim, start, t in pieces:
            assert t.dtype == dtype
            by_name.setdefault(name, []).append((start, dim, t))
    assert sorted(by_name) == sorted(want)
    for name, got in by_name.items():
        if m.split_dim is None:  # every rank has the whole tensor; the exporter picks one
            assert len(got) == tp
            assert all(s == 0 and torch.equal(t, want[name]) for s, _, t in got)
            continue
        got.sort(key=lambda x: x[0])
        dim = got[0][1]
        assert all(d == dim for _, d, _ in got)
        at = 0
        for start, _, t in got:  # blocks follow each other: no gap, no overlap
            assert start == at, (name, [(s, list(t.shape)) for s, _, t in got])
            at += t.shape[dim]
        assert torch.equal(torch.cat([t for _, _, t in got], dim=dim), want[name]), name


def test_vocab_padding_rows_are_never_pieces():
    """TP4 over 20 real rows padded to 32: ranks hold rows 0-7, 8-15, 16-23 (4 real), 24-31
    (padding only): the last gives no piece, the third only its 4 real rows."""
    geo = dict(vocab_size=20, vocab_padded=32, num_heads=1, num_kv_heads=1, head_dim=1)
    m = VocabColumn("x", "emb")
    full = torch.randn(32, 3)
    shards = _shards(m, full, 4)
    got = [m.shard_to_hf(s, {}, _ctx(r, 4, geo)) for r, s in enumerate(shards)]
    assert [[(n, d, s, list(t.shape)) for n, d, s, t in p] for p in got] == [
        [("emb", 0, 0, [8, 3])], [("emb", 0, 8, [8, 3])], [("emb", 0, 16, [4, 3])], []]


def test_qkv_pieces_are_the_ranks_query_groups():
    """GQA, 4 groups of 2 query heads, head_dim 3, at TP2: rank 1 holds groups 2-3, i.e. rows
    12-23 of q and 6-11 of k and v, one block per group, each a view of the shard."""
    geo = dict(vocab_size=1, vocab_padded=1, num_heads=8, num_kv_heads=4, head_dim=3)
    m = QKV("x", "q", "k", "v")
    shard = torch.randn(2 * 4 * 3, 5)
    got = m.shard_to_hf(shard, {}, _ctx(1, 2, geo))
    assert [(n, d, s, list(t.shape)) for n, d, s, t in got] == [
        ("q", 0, 12, [6, 5]), ("q", 0, 18, [6, 5]), ("k", 0, 6, [3, 5]), ("k", 0, 9, [3, 5]),
        ("v", 0, 6, [3, 5]), ("v", 0, 9, [3, 5])]
    assert all(t.untyped_storage().data_ptr() == shard.untyped_storage().data_ptr()
               and t.is_contiguous() for _, _, _, t in got)


def test_subclass_with_its_own_to_hf_falls_back_to_the_gather():
    """An inherited piece rule must never be used with a changed ``to_hf``: a subclass that
    overrides ``to_hf`` alone gets None (Qwen3-VL-MoE's fused experts are such), one that
    defines both keeps its own; TE aliases (clones) behave as their original."""
    from mvlm.models.qwen3_vl_moe.weights import FusedDownExperts, FusedGatedExperts

    class Renamed(Column):
        def to_hf(self, full, idx, ctx):
            return [("other", full)]

    class RenamedWithPieces(Renamed):
        def _shard_pieces(self, shard, idx, ctx):
            return [("other", 0, ctx.tp_rank * shard.shape[0], shard)]

    geo = dict(vocab_size=1, vocab_padded=1, num_heads=1, num_kv_heads=1, head_dim=1)
    c = _ctx(0, 2, geo)
    shard = torch.zeros(4, 2)
    assert Renamed("x", "a").shard_to_hf(shard, {}, c) is None
    assert RenamedWithPieces("x", "a").shard_to_hf(shard, {}, c)[0][0] == "other"
    down = FusedDownExperts("d.{E}", "f", "p.{E}", hidden=4)
    gate = FusedGatedExperts("g.{E}", "f", "g.{E}", "u.{E}", inter=4)
    assert down.shard_to_hf(shard, {"E": "0"}, c) is None
    assert gate.shard_to_hf(shard, {"E": "0"}, c) is None
    alias = te_aliases([Row("decoder.layers.{L}.mlp.experts.local_experts.{E}.linear_fc2.weight",
                            "h.{L}.{E}")])[-1]
    assert alias.mcore.endswith("weight{E}")
    [(name, dim, start, t)] = alias.shard_to_hf(shard, {"L": "1", "E": "2"}, c)
    assert (name, dim, start) == ("h.1.2", 1, 0) and t is shard


def _streamed_bytes(path, specs, tensors) -> bytes:
    w = StreamingSafetensorsWriter(path, specs)
    for name, _, _ in specs:
        w.write(name, tensors[name])
    w.close()
    return path.read_bytes()


def _pieces_file(path, specs, pieces_by_rank, out_dtype) -> tuple[bytes, int]:
    files, locs = plan_files([specs], max_shard_bytes=1 << 40)
    assert [f.name for f in files] == ["model.safetensors"]
    target = path / files[0].name
    create_planned_file(target, files[0])
    kernel = 0
    for pieces in reversed(pieces_by_rank):  # any order: every piece has its own place
        out = BlockWriter(target, size=files[0].size)  # one per rank, as the ranks of an export
        try:
            for name, dim, start, t in pieces:
                kernel += write_piece(out, locs[name], dim, start, t.to(out_dtype))
        finally:
            out.close()
    return target.read_bytes(), kernel


@pytest.mark.parametrize("tp", [2, 4])
def test_pieces_written_in_place_equal_the_streaming_writer(tmp_path, tp):
    """Every mapping kind in one file, fp32 shards exported as bf16: the file of pieces written
    at their offsets (rows, per-row column runs, dropped padding, replicated written once) is
    byte-identical to the streaming writer's file of ``to_hf(whole)``."""
    specs, want, pieces_by_rank = [], {}, [[] for _ in range(tp)]
    for i, kind in enumerate(KINDS):
        m, full, geo = _case(kind, tp, 10 + i, torch.float32)
        m.hf = tuple(f"{kind}.{h}" for h in m.hf)
        for name, t in m.to_hf(full, {}, _ctx(0, tp, geo)):
            want[name] = t.to(torch.bfloat16)
            specs.append((name, torch.bfloat16, list(t.shape)))
        for rank, shard in enumerate(_shards(m, full, tp)):
            if m.split_dim is None and rank != tp - 1:
                continue  # a replicated tensor: its planned writer alone
            pieces_by_rank[rank] += m.shard_to_hf(shard, {}, _ctx(rank, tp, geo))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ref = _streamed_bytes(tmp_path / "a" / "model.safetensors", specs, want)
    got, _ = _pieces_file(tmp_path / "b", specs, pieces_by_rank, torch.bfloat16)
    assert got == ref


def test_mapped_pieces_go_through_the_kernel_and_give_the_same_bytes(tmp_path, monkeypatch):
    """Row blocks of a tensor that is a copy-on-write map of a file: each block is one
    contiguous range of the map, written at its offset with ``copy_file_range``; the file
    equals the one written from plain memory."""
    from safetensors.torch import save_file

    from mvlm.convert.hf_io import SafetensorsReader

    monkeypatch.setattr(file_maps, "KERNEL_COPY_MIN_BYTES", 1)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 32, generator=g).to(torch.bfloat16)
    src = tmp_path / "src"
    src.mkdir()
    save_file({"w": w}, str(src / "model.safetensors"))
    try:
        mapped = SafetensorsReader(src).map_view("w")
        assert mapped is not None and torch.equal(mapped, w)
        specs = [("w", torch.bfloat16, [64, 32])]
        out = {}
        for tag, t in (("plain", w.clone()), ("mapped", mapped)):
            (tmp_path / tag).mkdir()
            pieces = [[("w", 0, 16 * r, t[16 * r:16 * (r + 1)])] for r in range(4)]
            out[tag] = _pieces_file(tmp_path / tag, specs, pieces, torch.bfloat16)
        assert out["plain"][1] == 0 and out["mapped"][1] == w.numel() * 2
        assert out["mapped"][0] == out["plain"][0]
    finally:
        file_maps.release_file_maps()


def test_plan_keeps_groups_whole_and_splits_files_by_size():
    f32 = torch.float32
    groups = [[("a", f32, [4])], [("b.q", f32, [4]), ("b.k", f32, [2])], [("c", f32, [8])]]
    files, locs = plan_files(groups, max_shard_bytes=40)  # a + b fill the first file
    assert [f.name for f in files] == ["model-00001-of-00002.safetensors",
                                       "model-00002-of-00002.safetensors"]
    assert [[s[0] for s in f.specs] for f in files] == [["a", "b.q", "b.k"], ["c"]]
    head = len(files[0].head)
    assert [locs[n].offset for n in ("a", "b.q", "b.k")] == [head, head + 16, head + 32]
    assert files[0].size == head + 40


_W = [("w", 1, 0, [4, 3])]
_N = [("n", 0, 0, [6])]
BAD_TILINGS = {
    "gap": [_W + _N, []],
    "overlap": [_W + _N, [("w", 1, 2, [4, 4])]],
    "twice": [[("w", 0, 0, [4, 6])] + _N, [("w", 0, 0, [4, 6])]],
    "missing": [[("w", 0, 0, [4, 6])], []],
    "mixed dims": [[("w", 0, 0, [2, 6])] + _N, [("w", 1, 0, [4, 6])]],
    "unplanned": [[("w", 0, 0, [4, 6]), ("x", 0, 0, [1])] + _N, []],
}


@pytest.mark.parametrize("why", list(BAD_TILINGS))
def test_tiling_check_refuses_gaps_and_overlaps(why):
    """The exporter sizes the files before writing: a missing piece would leave zeros, a
    duplicated one would be written twice. Both are refused from the metadata alone."""
    from mvlm.convert.bridge import _check_tiling

    _, locs = plan_files([[("w", torch.float32, [4, 6])], [("n", torch.float32, [6])]], 1 << 30)
    _check_tiling([_W + _N, [("w", 1, 3, [4, 3])]], locs)  # two column blocks: fine
    with pytest.raises(RuntimeError):
        _check_tiling(BAD_TILINGS[why], locs)
