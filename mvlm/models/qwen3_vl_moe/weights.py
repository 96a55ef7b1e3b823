"""Qwen3-VL-MoE weights, hub layout: Qwen3-VL's table (decoder under ``model.language_model.*``,
ViT + mergers under ``model.visual.*`` kept whole) with each layer's routed experts stored FUSED,
as the hub checkpoints and transformers 5's ``save_pretrained`` write them:

* ``mlp.experts.gate_up_proj`` [E, hidden, 2 * moe_inter]: expert e's gate is ``[e, :, :inter]``
  and its up ``[e, :, inter:]``, both transposed against ``nn.Linear`` (transformers'
  conversion mapping transposes dims 1-2 on load; its module holds [E, 2 * inter, hidden]);
* ``mlp.experts.down_proj`` [E, moe_inter, hidden]: expert e's down projection, transposed.

Megatron-Core keeps one module per expert (``local_experts.{E}``, or TE's ``weight{E}``), which
EP spreads over ranks and expert-TP splits along ``moe_inter``. Loading reads, per expert, just
its own slab of the fused tensor and just this ETP rank's rows of it. Export cannot write a fused
tensor from one expert (its experts live on different EP ranks and are gathered one parameter at
a time), so each expert is first written under its per-expert name
(``mlp.experts.{E}.gate_proj.weight`` ...) and :func:`fuse_experts` -- the mappings'
``post_export`` hook, run once by the exporter after every rank has written -- stacks them into
the fused tensors, bit for bit, and rewrites the shards and index. The in-memory weight stream
(:func:`mvlm.convert.stream.iter_hf_tensors`) yields the per-expert names.
"""
from __future__ import annotations

import os
import re
from collections import defaultdict
from pathlib import Path

import torch
from transformers import PretrainedConfig

from mvlm.convert.hf_io import (
    INDEX_NAME,
    SINGLE_NAME,
    SafetensorsReader,
    StreamingSafetensorsWriter,
    write_index,
)
from mvlm.convert.mapping import (
    Mapping,
    Replicated,
    Row,
    ShardShapeError,
    _rows,
    fill,
    te_aliases,
)
from mvlm.models.decoder_table import decoder_table
from mvlm.models.gpt import TextArch
from mvlm.models.qwen3_vl.tower import DeepStackTower
from mvlm.models.qwen3_vl.weights import LLM_PREFIX, TOWER_PREFIX
from mvlm.models.vision import build_hf_vision

_D = "decoder.layers.{L}.mlp.experts.local_experts.{E}."
_H = LLM_PREFIX + "layers.{L}.mlp.experts."


_PIECE_RX = re.compile(r"^(?P<p>.*\.mlp\.experts\.)(?P<E>\d+)\.(?P<k>gate_proj|up_proj|down_proj)"
                       r"\.weight$")


def fuse_experts(out_dir: str | os.PathLike, weight_map: dict[str, str]) -> dict[str, str]:
    """Rewrite an export's shards so per-expert tensors become the hub's fused ones.

    ``gate_up_proj[e] = cat(gate_e, up_e).T`` and ``down_proj[e] = down_e.T``, exact copies.
    Every output file is written beside the old ones first and the old ones removed after, so
    pieces can be read from any shard while fusing; a fused tensor goes to the shard of its
    expert 0. Returns the new weight map (names -> file)."""
    out = Path(out_dir)
    reader = SafetensorsReader(out)
    groups: dict[str, dict[int, dict[str, str]]] = defaultdict(lambda: defaultdict(dict))
    for name in weight_map:
        m = _PIECE_RX.match(name)
        if m:
            groups[m["p"]][int(m["E"])][m["k"]] = name
    if not groups:
        return weight_map
    plan: dict[str, list[tuple[str, torch.dtype, list[int], object]]] = defaultdict(list)
    for name, f in weight_map.items():  # the kept tensors, in their files, in order
        if not _PIECE_RX.match(name):
            plan[f].append((name, reader._loc(name).dtype, reader.shape(name), name))
    for prefix, experts in groups.items():
        n = len(experts)
        if sorted(experts) != list(range(n)) or any(
                set(k) != {"gate_proj", "up_proj", "down_proj"} for k in experts.values()):
            raise RuntimeError(f"{prefix}: the export holds an incomplete set of experts "
                               f"{sorted(experts)}; cannot fuse")
        g0 = experts[0]["gate_proj"]
        inter, hidden = reader.shape(g0)
        dtype = reader._loc(g0).dtype
        f = weight_map[g0]
        plan[f].append((prefix + "gate_up_proj", dtype, [n, hidden, 2 * inter],
                        [(experts[e]["gate_proj"], experts[e]["up_proj"]) for e in range(n)]))
        plan[f].append((prefix + "down_proj", dtype, [n, inter, hidden],
                        [(experts[e]["down_proj"],) for e in range(n)]))
    files = [f for f in dict.fromkeys(weight_map.values()) if plan.get(f)]
    names = ([SINGLE_NAME] if len(files) == 1 else
             [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))])
    new_map: dict[str, str] = {}
    total = 0
    for f, new in zip(files, names):
        specs = [(n, d, s) for n, d, s, _ in plan[f]]
        w = StreamingSafetensorsWriter(out / f".fuse-{new}", specs)
        for name, _, _, src in plan[f]:
            if isinstance(src, str):
                t = reader.read(src)
            else:  # per expert: [in, out] slabs of the hub layout
                t = torch.stack([torch.cat([reader.read(x) for x in srcs], 0).t()
                                 for srcs in src])
            w.write(name, t)
            new_map[name] = new
            total += t.numel() * t.element_size()
        w.close()
    for f in set(weight_map.values()):
        (out / f).unlink()
    (out / INDEX_NAME).unlink(missing_ok=True)
    for new in names:
        (out / f".fuse-{new}").rename(out / new)
    if len(names) > 1:
        write_index(out, new_map, total)
    return new_map


def _expert_slab(reader, name: str, e: int, rows: int) -> torch.Tensor:
    """Expert ``e``'s [rows, cols] matrix of a fused [E, ., .] tensor, nn.Linear orientation.

    The hub stores [E, in, out] (transposed); a checkpoint saved from the module tree holds
    [E, out, in]. ``rows`` (the Linear's out features) tells them apart; a square slab is read
    as the hub layout, as transformers does for a shape it cannot tell."""
    shape = reader.shape(name)
    if len(shape) != 3 or e >= shape[0] or rows not in shape[1:]:
        raise ShardShapeError(tuple(shape))
    slab = reader.read(name, 0, e, e + 1)[0]
    return slab.t() if shape[2] == rows else slab


class FusedGatedExperts(Mapping):
    """An expert's SwiGLU linear_fc1 [2 * inter / ETP, hidden] from the fused ``gate_up_proj``;
    each ETP rank holds [its gate rows; its up rows], as :class:`GatedMLP`."""

    split_dim = 0

    post_export = staticmethod(fuse_experts)

    def __init__(self, mcore: str, fused: str, gate: str, up: str, inter: int) -> None:
        super().__init__(mcore, fused, expert=True)
        self.pieces = (gate, up)
        self.inter = inter

    def load(self, reader, idx, ctx):
        inter = self.inter
        slab = _expert_slab(reader, self.hf_names(idx)[0], int(idx["E"]), 2 * inter)
        lo, hi = _rows(ctx, inter)
        return torch.cat([slab[lo:hi], slab[inter + lo:inter + hi]], dim=0).contiguous()

    def to_hf(self, full, idx, ctx):
        tail = full.shape[1:]
        per = full.shape[0] // (2 * ctx.tp_size)
        parts = full.reshape(ctx.tp_size, 2, per, *tail)
        gate, up = (fill(p, idx) for p in self.pieces)
        return [(gate, parts[:, 0].reshape(-1, *tail)), (up, parts[:, 1].reshape(-1, *tail))]


class FusedDownExperts(Row):
    """An expert's linear_fc2 [hidden, inter / ETP] from the fused ``down_proj``."""

    post_export = staticmethod(fuse_experts)

    def __init__(self, mcore: str, fused: str, piece: str, hidden: int) -> None:
        super().__init__(mcore, fused, expert=True)
        self.pieces = (piece,)
        self.hidden = hidden

    def load(self, reader, idx, ctx):
        slab = _expert_slab(reader, self.hf_names(idx)[0], int(idx["E"]), self.hidden)
        lo, hi = _rows(ctx, slab.shape[1])
        return slab[:, lo:hi].contiguous()

    def load_into(self, reader, idx, ctx, out):
        Mapping.load_into(self, reader, idx, ctx, out)

    def to_hf(self, full, idx, ctx):
        return [(fill(self.pieces[0], idx), full)]


def mappings(hf_config: PretrainedConfig, arch: TextArch) -> list[Mapping]:
    """Qwen3-VL's table; the per-expert rows Qwen3-MoE's layout would give are replaced by the
    fused-tensor mappings (and their TE aliases)."""
    table = [m for m in decoder_table(arch, prefix=LLM_PREFIX)
             if ".mlp.experts." not in m.mcore]
    table += te_aliases([
        FusedGatedExperts(_D + "linear_fc1.weight", _H + "gate_up_proj",
                          _H + "{E}.gate_proj.weight", _H + "{E}.up_proj.weight",
                          inter=arch.moe_ffn_hidden_size),
        FusedDownExperts(_D + "linear_fc2.weight", _H + "down_proj", _H + "{E}.down_proj.weight",
                         hidden=arch.hidden_size),
    ])
    return table + [Replicated("vision_model.tower.{*}", TOWER_PREFIX + "{*}")]


def build_tower(cfg: PretrainedConfig, dtype: torch.dtype, device: str) -> DeepStackTower:
    """transformers' Qwen3-VL-MoE ViT, run as Qwen3-VL's DeepStack tower."""
    return DeepStackTower(build_hf_vision("transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe",
                                          "Qwen3VLMoeVisionModel", cfg.vision_config, dtype,
                                          device).tower)
