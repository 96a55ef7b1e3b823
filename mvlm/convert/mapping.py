"""Declarative parameter mappings between HF tensors and Megatron-Core shards.

A family's weight table is a list of these objects read top to bottom. Each one knows, for one
Megatron-Core parameter name pattern, which HF tensors it is made of, how to read only the slice a
tensor-parallel rank owns (``load``), and how to turn the full (TP-gathered) Megatron tensor back
into HF tensors (``to_hf``). ``shard_to_hf`` gives, from one TP rank's shard alone, the blocks of
those HF tensors that the shard holds, so that an exporter can write each rank's part in place
without gathering the whole tensor first. Patterns use ``{L}`` for the global decoder layer,
``{E}`` for the global expert index and ``{*}`` for a free suffix (used for vision towers kept in
HF layout).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

import torch

# (HF name, dim, start, tensor): ``tensor`` is ``full_hf[name].narrow(dim, start, len)``
Piece = tuple[str, int, int, torch.Tensor]


class TensorReader(Protocol):
    def read(self, name: str, dim: int | None = None, start: int | None = None,
             stop: int | None = None) -> torch.Tensor: ...

    def shape(self, name: str) -> list[int]: ...


class ShardShapeError(ValueError):
    """The HF tensors give a shard of another shape than the Megatron parameter (config.json
    does not match the weights); ``shape`` is what the HF tensors give."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__(f"HF tensors give a shard of shape {shape}")
        self.shape = tuple(shape)


def _read_into(reader: TensorReader, name: str, out: torch.Tensor, dim: int | None = None,
               start: int | None = None, stop: int | None = None) -> None:
    """``reader.read_into`` when the reader has it (no intermediate tensor), else read + copy."""
    fast = getattr(reader, "read_into", None)
    if fast is not None:
        fast(name, out, dim, start, stop)
    else:
        out.copy_(reader.read(name, dim, start, stop))


@dataclass(frozen=True)
class ShardCtx:
    """Where this rank's shard sits: TP rank/size (ETP for expert mappings), true and padded
    vocabulary sizes, and attention geometry for QKV (re)interleaving."""

    tp_rank: int
    tp_size: int
    vocab_size: int
    vocab_padded: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


def _pattern_regex(template: str) -> re.Pattern:
    rx = re.escape(template)
    rx = rx.replace(r"\{L\}", r"(?P<L>\d+)").replace(r"\{E\}", r"(?P<E>\d+)")
    rx = rx.replace(r"\{\*\}", r"(?P<star>.+)")
    return re.compile("^" + rx + "$")


def _defined_by(cls: type, attr: str) -> type:
    """The class of ``cls``'s MRO whose own body defines ``attr``."""
    return next(c for c in cls.__mro__ if attr in c.__dict__)


def fill(template: str, idx: dict[str, str]) -> str:
    out = template
    for k, v in idx.items():
        out = out.replace("{" + ("*" if k == "star" else k) + "}", str(v))
    return out


class Mapping:
    """Base class. ``split_dim`` is the dimension along which the Megatron tensor is split over TP
    (None: replicated); ``expert`` says the TP group is the expert-tensor-parallel one."""

    split_dim: int | None = None

    def __init__(self, mcore: str, *hf: str, expert: bool = False) -> None:
        self.mcore = mcore
        self.hf = hf
        self.expert = expert
        self._rx = _pattern_regex(mcore)

    def match(self, mcore_name: str) -> dict[str, str] | None:
        m = self._rx.match(mcore_name)
        return None if m is None else {k: v for k, v in m.groupdict().items() if v is not None}

    def hf_names(self, idx: dict[str, str]) -> list[str]:
        return [fill(h, idx) for h in self.hf]

    def load(self, reader: TensorReader, idx: dict[str, str], ctx: ShardCtx) -> torch.Tensor:
        raise NotImplementedError

    def load_into(self, reader: TensorReader, idx: dict[str, str], ctx: ShardCtx,
                  out: torch.Tensor) -> None:
        """Fill ``out`` (this rank's shard, e.g. the parameter itself) with what ``load`` returns.

        Subclasses read each HF slice straight into its place in ``out`` when the HF shapes are
        the ones this shard implies (``_direct_ok``); otherwise, and here, ``load`` + copy, which
        raises ``ShardShapeError`` on a mismatch as before."""
        t = self.load(reader, idx, ctx)
        if tuple(t.shape) != tuple(out.shape):
            raise ShardShapeError(tuple(t.shape))
        out.copy_(t)

    def to_hf(self, full: torch.Tensor, idx: dict[str, str], ctx: ShardCtx
              ) -> list[tuple[str, torch.Tensor]]:
        raise NotImplementedError

    def shard_to_hf(self, shard: torch.Tensor, idx: dict[str, str], ctx: ShardCtx
                    ) -> list[Piece] | None:
        """This rank's blocks of the HF tensors ``to_hf`` makes of the whole parameter, from
        this rank's shard only; None when the mapping cannot say (the exporter then gathers).

        Every piece is ``to_hf(full)[name].narrow(dim, start, n)``: the pieces of all ranks of
        the group tile each HF tensor exactly once, except for mappings that are not split
        (``split_dim`` None), whose every rank gives the whole tensor (one writes it). Works
        on meta tensors too (the exporter plans from shapes before any data moves).

        A subclass that overrides ``to_hf`` below the class of its ``_shard_pieces`` gets None,
        so an inherited piece rule can never disagree with a changed ``to_hf``."""
        cls = type(self)
        if not issubclass(_defined_by(cls, "_shard_pieces"), _defined_by(cls, "to_hf")):
            return None
        return self._shard_pieces(shard, idx, ctx)

    def _shard_pieces(self, shard: torch.Tensor, idx: dict[str, str], ctx: ShardCtx
                      ) -> list[Piece] | None:
        return None

    def hf_shapes(self, full_shape: list[int], idx: dict[str, str], ctx: ShardCtx
                  ) -> list[tuple[str, list[int]]]:
        """HF output names and shapes from the full Megatron shape, without any data (the
        streaming writer needs every header before the first byte)."""
        meta = torch.empty(full_shape, device="meta")
        return [(n, list(t.shape)) for n, t in self.to_hf(meta, idx, ctx)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.mcore!r} <- {', '.join(self.hf)})"


def _rows(ctx: ShardCtx, n: int) -> tuple[int, int]:
    if n % ctx.tp_size:
        raise ValueError(f"dimension {n} is not divisible by TP={ctx.tp_size}")
    per = n // ctx.tp_size
    return ctx.tp_rank * per, (ctx.tp_rank + 1) * per


class Replicated(Mapping):
    """Same tensor on every TP rank (norms, routers, biases of row-parallel layers, vision)."""

    def load(self, reader, idx, ctx):
        return reader.read(self.hf_names(idx)[0])

    def load_into(self, reader, idx, ctx, out):
        name = self.hf_names(idx)[0]
        if list(reader.shape(name)) != list(out.shape):
            raise ShardShapeError(tuple(reader.shape(name)))
        _read_into(reader, name, out)

    def to_hf(self, full, idx, ctx):
        return [(self.hf_names(idx)[0], full)]

    def _shard_pieces(self, shard, idx, ctx):
        return [(self.hf_names(idx)[0], 0, 0, shard)]


class Column(Mapping):
    """Output dimension (rows) split over TP."""

    split_dim = 0

    def load(self, reader, idx, ctx):
        name = self.hf_names(idx)[0]
        lo, hi = _rows(ctx, reader.shape(name)[0])
        return reader.read(name, 0, lo, hi)

    def load_into(self, reader, idx, ctx, out):
        name = self.hf_names(idx)[0]
        shape = list(reader.shape(name))
        lo, hi = _rows(ctx, shape[0])
        if [hi - lo, *shape[1:]] != list(out.shape):
            raise ShardShapeError((hi - lo, *shape[1:]))
        _read_into(reader, name, out, 0, lo, hi)

    def to_hf(self, full, idx, ctx):
        return [(self.hf_names(idx)[0], full)]

    def _shard_pieces(self, shard, idx, ctx):
        if shard.dim() == 0:
            return None
        return [(self.hf_names(idx)[0], 0, ctx.tp_rank * shard.shape[0], shard)]


class Row(Mapping):
    """Input dimension (columns) split over TP."""

    split_dim = 1

    def load(self, reader, idx, ctx):
        name = self.hf_names(idx)[0]
        lo, hi = _rows(ctx, reader.shape(name)[1])
        return reader.read(name, 1, lo, hi)

    def load_into(self, reader, idx, ctx, out):
        name = self.hf_names(idx)[0]
        shape = list(reader.shape(name))
        lo, hi = _rows(ctx, shape[1])
        if [shape[0], hi - lo, *shape[2:]] != list(out.shape):
            raise ShardShapeError((shape[0], hi - lo, *shape[2:]))
        _read_into(reader, name, out, 1, lo, hi)

    def to_hf(self, full, idx, ctx):
        return [(self.hf_names(idx)[0], full)]

    def _shard_pieces(self, shard, idx, ctx):
        if shard.dim() < 2:
            return None
        return [(self.hf_names(idx)[0], 1, ctx.tp_rank * shard.shape[1], shard)]


class VocabColumn(Mapping):
    """Embedding / output layer: rows padded to ``vocab_padded`` then split over TP. Padding rows
    are zero on load and trimmed on export."""

    split_dim = 0

    def load(self, reader, idx, ctx):
        name = self.hf_names(idx)[0]
        v, hidden = reader.shape(name)
        if v != ctx.vocab_size:
            raise ValueError(f"{name} has {v} rows but config vocab_size is {ctx.vocab_size}")
        lo, hi = _rows(ctx, ctx.vocab_padded)
        out = None
        if lo < v:
            part = reader.read(name, 0, lo, min(hi, v))
            out = part.new_zeros((hi - lo, hidden))
            out[: part.shape[0]] = part
        if out is None:
            dtype = reader.read(name, 0, 0, 1).dtype
            out = torch.zeros((hi - lo, hidden), dtype=dtype)
        return out

    def load_into(self, reader, idx, ctx, out):
        name = self.hf_names(idx)[0]
        v, hidden = reader.shape(name)
        if v != ctx.vocab_size:
            raise ValueError(f"{name} has {v} rows but config vocab_size is {ctx.vocab_size}")
        lo, hi = _rows(ctx, ctx.vocab_padded)
        if [hi - lo, hidden] != list(out.shape):
            raise ShardShapeError((hi - lo, hidden))
        n = max(0, min(hi, v) - lo)
        if n:
            _read_into(reader, name, out[:n], 0, lo, lo + n)
        out[n:].zero_()  # padding rows

    def to_hf(self, full, idx, ctx):
        return [(self.hf_names(idx)[0], full[: ctx.vocab_size])]

    def _shard_pieces(self, shard, idx, ctx):
        """The shard's rows of the real vocabulary; a rank holding only padding gives none."""
        lo = ctx.tp_rank * shard.shape[0]
        n = max(0, min(lo + shard.shape[0], ctx.vocab_size) - lo)
        return [(self.hf_names(idx)[0], 0, lo, shard[:n])] if n else []


class QKV(Mapping):
    """Megatron's fused QKV: per query group, that group's query heads then its K then its V;
    TP ranks own whole groups. Works for weights ([rows, hidden]) and biases ([rows])."""

    split_dim = 0

    def load(self, reader, idx, ctx):
        qn, kn, vn = self.hf_names(idx)
        d, ng = ctx.head_dim, ctx.num_kv_heads
        hpg = ctx.num_heads // ng
        g0, g1 = _rows(ctx, ng)
        q = reader.read(qn, 0, g0 * hpg * d, g1 * hpg * d)
        k = reader.read(kn, 0, g0 * d, g1 * d)
        v = reader.read(vn, 0, g0 * d, g1 * d)
        tail = q.shape[1:]
        n = g1 - g0
        return torch.cat([q.reshape(n, hpg * d, *tail), k.reshape(n, d, *tail),
                          v.reshape(n, d, *tail)], dim=1).reshape(-1, *tail)

    def load_into(self, reader, idx, ctx, out):
        qn, kn, vn = self.hf_names(idx)
        d, ng = ctx.head_dim, ctx.num_kv_heads
        hpg = ctx.num_heads // ng
        g0, g1 = _rows(ctx, ng)
        qs, ks, vs = (list(reader.shape(x)) for x in (qn, kn, vn))
        tail = qs[1:]
        n = g1 - g0
        if (qs[0] != ng * hpg * d or ks != vs or ks != [ng * d, *tail]
                or list(out.shape) != [n * (hpg + 2) * d, *tail] or not out.is_contiguous()):
            return super().load_into(reader, idx, ctx, out)  # concatenate, report the shape
        grp = out.view(n, (hpg + 2) * d, *tail)
        for i, g in enumerate(range(g0, g1)):  # each query group: its heads, then K, then V
            _read_into(reader, qn, grp[i, : hpg * d], 0, g * hpg * d, (g + 1) * hpg * d)
            _read_into(reader, kn, grp[i, hpg * d: (hpg + 1) * d], 0, g * d, (g + 1) * d)
            _read_into(reader, vn, grp[i, (hpg + 1) * d:], 0, g * d, (g + 1) * d)

    def to_hf(self, full, idx, ctx):
        qn, kn, vn = self.hf_names(idx)
        d, ng = ctx.head_dim, ctx.num_kv_heads
        hpg = ctx.num_heads // ng
        tail = full.shape[1:]
        g = full.reshape(ng, (hpg + 2) * d, *tail)
        q, k, v = torch.split(g, [hpg * d, d, d], dim=1)
        return [(qn, q.reshape(-1, *tail)), (kn, k.reshape(-1, *tail)),
                (vn, v.reshape(-1, *tail))]

    def _shard_pieces(self, shard, idx, ctx):
        """Per query group of the rank: its query heads, K and V are a run of the shard's rows
        and a row block of q, k and v each. One piece per group and tensor, each a view of the
        shard (no copy; a kernel copy when the shard is a memory map), in tensor order."""
        qn, kn, vn = self.hf_names(idx)
        d, ng = ctx.head_dim, ctx.num_kv_heads
        hpg = ctx.num_heads // ng
        n = ng // ctx.tp_size
        rows = (hpg + 2) * d  # one group's rows in the shard
        if ng % ctx.tp_size or shard.dim() == 0 or shard.shape[0] != n * rows:
            return None
        g0 = ctx.tp_rank * n
        return ([(qn, 0, (g0 + i) * hpg * d, shard[i * rows: i * rows + hpg * d])
                 for i in range(n)]
                + [(kn, 0, (g0 + i) * d, shard[i * rows + hpg * d: i * rows + (hpg + 1) * d])
                   for i in range(n)]
                + [(vn, 0, (g0 + i) * d, shard[i * rows + (hpg + 1) * d: (i + 1) * rows])
                   for i in range(n)])


class GatedMLP(Mapping):
    """SwiGLU's linear_fc1: each TP rank holds [its gate rows; its up rows]."""

    split_dim = 0

    def load(self, reader, idx, ctx):
        gn, un = self.hf_names(idx)
        lo, hi = _rows(ctx, reader.shape(gn)[0])
        return torch.cat([reader.read(gn, 0, lo, hi), reader.read(un, 0, lo, hi)], dim=0)

    def load_into(self, reader, idx, ctx, out):
        gn, un = self.hf_names(idx)
        gs, us = list(reader.shape(gn)), list(reader.shape(un))
        lo, hi = _rows(ctx, gs[0])
        if gs != us or [2 * (hi - lo), *gs[1:]] != list(out.shape):
            return super().load_into(reader, idx, ctx, out)
        _read_into(reader, gn, out[: hi - lo], 0, lo, hi)
        _read_into(reader, un, out[hi - lo:], 0, lo, hi)

    def to_hf(self, full, idx, ctx):
        gn, un = self.hf_names(idx)
        tail = full.shape[1:]
        per = full.shape[0] // (2 * ctx.tp_size)
        parts = full.reshape(ctx.tp_size, 2, per, *tail)
        return [(gn, parts[:, 0].reshape(-1, *tail)), (un, parts[:, 1].reshape(-1, *tail))]

    def _shard_pieces(self, shard, idx, ctx):
        """[gate rows; up rows] of this rank: the same row block of each."""
        gn, un = self.hf_names(idx)
        if shard.dim() == 0 or shard.shape[0] % 2:
            return None
        per = shard.shape[0] // 2
        return [(gn, 0, ctx.tp_rank * per, shard[:per]), (un, 0, ctx.tp_rank * per, shard[per:])]


def hub_name(name: str, prefixes: tuple[tuple[str, str], ...]) -> str:
    """Module-tree tensor name -> hub-layout name (unchanged when already in the hub layout).

    The weight tables name HF tensors in the hub layout; transformers 5's module tree may nest
    them differently, and checkpoints saved from a state dict contain the module-tree names.
    ``prefixes`` are the checkpoint's family's (module-tree prefix, hub prefix) pairs
    (``FamilySpec.module_tree_prefixes``): families disagree (Qwen-VL's
    ``model.language_model.`` is the hub's ``model.``, LLaVA's is ``language_model.model.``), so
    the family must be known."""
    for tree, hub in prefixes:
        if name.startswith(tree):
            return hub + name[len(tree):]
    return name


def find_mapping(table: list[Mapping], mcore_name: str) -> tuple[Mapping, dict[str, str]]:
    for m in table:
        idx = m.match(mcore_name)
        if idx is not None:
            return m, idx
    raise KeyError(f"no weight mapping covers Megatron parameter {mcore_name!r}")


def te_aliases(table: list[Mapping]) -> list[Mapping]:
    """Add Transformer Engine's names: TE fuses the pre-attention norm into linear_qkv and the
    pre-MLP norm into linear_fc1 (dense layers), and stores grouped experts as weight{E}."""
    extra: list[Mapping] = []
    for m in table:
        name = m.mcore
        alias = None
        kind = name.rsplit(".", 1)[-1]  # LayerNorm has a bias too: layer_norm_bias
        if name.endswith(("input_layernorm.weight", "input_layernorm.bias")):
            alias = name.replace(f"input_layernorm.{kind}",
                                 f"self_attention.linear_qkv.layer_norm_{kind}")
        elif name.endswith(("pre_mlp_layernorm.weight", "pre_mlp_layernorm.bias")):
            alias = name.replace(f"pre_mlp_layernorm.{kind}", f"mlp.linear_fc1.layer_norm_{kind}")
        elif ".mlp.experts.local_experts.{E}." in name:
            base = name.replace("local_experts.{E}.", "")
            alias = base[: -len(".weight")] + ".weight{E}" if base.endswith(".weight") else None
        if alias:
            clone = type(m).__new__(type(m))
            clone.__dict__.update(m.__dict__)
            clone.mcore = alias
            clone._rx = _pattern_regex(alias)
            extra.append(clone)
    return table + extra
