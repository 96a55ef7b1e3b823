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

LoRA adapters on the experts follow the same split: mvlm writes one adapter per expert, and
:func:`fuse_peft_experts` (the mappings' ``post_peft_export`` hook) turns them into what peft's
``target_parameters`` LoRA on the fused tensors holds; :func:`split_peft_experts` reverses it
when mvlm reads such a directory back.
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


_PEFT_RX = re.compile(r"^(?P<p>.*\.mlp\.experts)\.(?P<E>\d+)\.(?P<k>gate_proj|up_proj|down_proj)"
                      r"\.(?P<w>lora_A|lora_B)\.weight$")
_FUSED_RX = re.compile(r"^(?P<p>.*\.mlp\.experts)(?P<inner>\.base_layer)?\.(?P<w>lora_A|lora_B)"
                       r"\.weight$")
GATE_UP, DOWN = "mlp.experts.gate_up_proj", "mlp.experts.down_proj"


def fuse_peft_experts(tensors: dict[str, torch.Tensor], names: dict
                      ) -> tuple[dict[str, torch.Tensor], dict]:
    """Per-expert adapters (peft keys ``...mlp.experts.{E}.gate_proj.lora_A.weight`` ...) -> the
    layout of peft's ParamWrapper on the fused ``gate_up_proj`` / ``down_proj`` parameters.

    peft keeps, per fused parameter, ``lora_A`` [r * E, in] (expert e's A in rows e*r..e*r+r)
    and ``lora_B`` [out, r * E] (column k * E + e is expert e's B column k); gate and up share
    one A in mvlm, so gate_up's B is [B_gate; B_up]. With both parameters targeted peft nests
    the wrappers: the first of ``target_parameters`` (gate_up) sits under ``base_layer``.
    ``names["parameters"]`` gets the ``target_parameters`` list; the per-expert modules leave
    ``names["modules"]``."""
    groups: dict[str, dict[int, dict[tuple[str, str], torch.Tensor]]] = defaultdict(
        lambda: defaultdict(dict))
    out: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        m = _PEFT_RX.match(k)
        if m:
            groups[m["p"]][int(m["E"])][(m["k"], m["w"])] = v
        else:
            out[k] = v
    if not groups:
        return tensors, names
    params: set[str] = set()
    for prefix, experts in groups.items():
        n = len(experts)
        got = {frozenset(x) for x in experts.values()}
        if sorted(experts) != list(range(n)) or len(got) != 1:
            raise RuntimeError(f"{prefix}: adapters on an incomplete or uneven set of experts "
                               f"{sorted(experts)}; peft adapts all experts of a fused tensor")
        kinds = {k for k, _ in next(iter(got))}
        pairs = []
        if {"gate_proj", "up_proj"} <= kinds:
            for e in range(n):
                if not torch.equal(experts[e][("gate_proj", "lora_A")],
                                   experts[e][("up_proj", "lora_A")]):
                    raise RuntimeError(f"{prefix}.{e}: gate and up adapters differ in lora_A")
            pairs.append((GATE_UP, [experts[e][("gate_proj", "lora_A")] for e in range(n)],
                          [torch.cat([experts[e][("gate_proj", "lora_B")],
                                      experts[e][("up_proj", "lora_B")]]) for e in range(n)]))
        elif kinds & {"gate_proj", "up_proj"}:
            raise RuntimeError(f"{prefix}: gate_proj and up_proj are one fused tensor in the "
                               "hub layout; adapt both or neither")
        if "down_proj" in kinds:
            pairs.append((DOWN, [experts[e][("down_proj", "lora_A")] for e in range(n)],
                          [experts[e][("down_proj", "lora_B")] for e in range(n)]))
        for param, a, b in pairs:
            inner = ".base_layer" if param == GATE_UP and len(pairs) == 2 else ""
            a, b = torch.stack(a), torch.stack(b)  # [E, r, in], [E, out, r]
            out[f"{prefix}{inner}.lora_A.weight"] = a.reshape(-1, a.shape[-1]).contiguous()
            out[f"{prefix}{inner}.lora_B.weight"] = b.permute(1, 2, 0).reshape(
                b.shape[1], -1).contiguous()
            params.add(param)
    modules = [m for m in names["modules"] if not re.search(r"\.mlp\.experts\.\d+\.", m)]
    return out, {**names, "modules": modules,
                 "parameters": [p for p in (GATE_UP, DOWN) if p in params]}


def split_peft_experts(tensors: dict[str, torch.Tensor], conf: dict
                       ) -> dict[str, torch.Tensor]:
    """Inverse of :func:`fuse_peft_experts`: peft's fused-expert adapters -> per-expert keys."""
    params = list(conf.get("target_parameters") or [])
    if not params:
        return tensors
    r = int(conf["r"])
    out: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        m = _FUSED_RX.match(k)
        if not m:
            out[k] = v
            continue
        # a lone parameter has no base_layer; of two, the first listed is the inner one
        param = params[0] if (m["inner"] or len(params) == 1) else params[1]
        if m["w"] == "lora_A":
            per = v.reshape(-1, r, v.shape[-1])  # [E, r, in]
        else:
            per = v.reshape(v.shape[0], r, -1).permute(2, 0, 1)  # [E, out, r]
        for e in range(per.shape[0]):
            x = per[e].contiguous()
            if param.endswith("down_proj"):
                out[f"{m['p']}.{e}.down_proj.{m['w']}.weight"] = x
            elif m["w"] == "lora_A":
                out[f"{m['p']}.{e}.gate_proj.lora_A.weight"] = x
                out[f"{m['p']}.{e}.up_proj.lora_A.weight"] = x.clone()
            else:
                half = x.shape[0] // 2
                out[f"{m['p']}.{e}.gate_proj.lora_B.weight"] = x[:half].contiguous()
                out[f"{m['p']}.{e}.up_proj.lora_B.weight"] = x[half:].contiguous()
    return out


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
    post_peft_export = staticmethod(fuse_peft_experts)
    pre_peft_load = staticmethod(split_peft_experts)

    def __init__(self, mcore: str, fused: str, gate: str, up: str, inter: int) -> None:
        super().__init__(mcore, fused, expert=True)
        self.pieces = (gate, up)
        self.inter = inter

    def load(self, reader, idx, ctx):
        inter = self.inter
        slab = _expert_slab(reader, self.hf_names(idx)[0], int(idx["E"]), 2 * inter)
        lo, hi = _rows(ctx, inter)
        return torch.cat([slab[lo:hi], slab[inter + lo:inter + hi]], dim=0).contiguous()

    def peft_names(self, idx) -> list[str]:
        """The per-expert names a peft adapter is read under (after :func:`split_peft_experts`)."""
        return [fill(p, idx) for p in self.pieces]

    def peft_load(self, reader, idx, ctx):
        gate, up = (reader.read(n) for n in self.peft_names(idx))
        lo, hi = _rows(ctx, gate.shape[0])
        return torch.cat([gate[lo:hi], up[lo:hi]], dim=0).contiguous()

    def to_hf(self, full, idx, ctx):
        tail = full.shape[1:]
        per = full.shape[0] // (2 * ctx.tp_size)
        parts = full.reshape(ctx.tp_size, 2, per, *tail)
        gate, up = (fill(p, idx) for p in self.pieces)
        return [(gate, parts[:, 0].reshape(-1, *tail)), (up, parts[:, 1].reshape(-1, *tail))]


class FusedDownExperts(Row):
    """An expert's linear_fc2 [hidden, inter / ETP] from the fused ``down_proj``."""

    post_export = staticmethod(fuse_experts)
    post_peft_export = staticmethod(fuse_peft_experts)
    pre_peft_load = staticmethod(split_peft_experts)

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

    def peft_names(self, idx) -> list[str]:
        return [fill(self.pieces[0], idx)]

    def peft_load(self, reader, idx, ctx):
        t = reader.read(self.peft_names(idx)[0])
        lo, hi = _rows(ctx, t.shape[1])
        return t[:, lo:hi].contiguous()

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
