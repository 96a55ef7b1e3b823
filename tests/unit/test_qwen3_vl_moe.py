"""Qwen3-VL-MoE's fused experts without a process group: the per-expert, per-ETP-rank slices the
weight table reads from ``gate_up_proj`` / ``down_proj`` (hub layout and save_pretrained's module
layout), their inverse, and the export's re-fusing of per-expert tensors across shards, all
bit-exact; and dense Qwen3-VL weights under a Qwen3-VL-MoE config refused by name.

Logits against transformers at EP2 and the round trip (saved at EP2, exported at TP2 x EP2) are
the ``qwen3_vl_moe`` case of tests/dist/test_convert_roundtrip.py.
"""
from __future__ import annotations

import re
import shutil

import torch
from helpers import run_mvlm

E, H, INTER = 4, 6, 4
PRE = "model.language_model.layers.3.mlp.experts."


class _DictReader:
    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.t = tensors

    def shape(self, name):
        return list(self.t[name].shape)

    def read(self, name, dim=None, start=None, stop=None):
        t = self.t[name]
        return t.clone() if dim is None else t.narrow(dim, start, stop - start).clone()


def _table():
    """The expert rows of the table for a 4-layer, 4-expert decoder, and a ShardCtx maker."""
    from mvlm.convert.mapping import ShardCtx, find_mapping
    from mvlm.models.gpt import TextArch
    from mvlm.models.qwen3_vl_moe.weights import mappings

    arch = TextArch(vocab_size=10, hidden_size=H, num_layers=4, num_heads=2, num_kv_heads=2,
                    head_dim=3, ffn_hidden_size=8, norm_eps=1e-6, rope_theta=1e4,
                    max_position_embeddings=64, tie_word_embeddings=False, qk_layernorm=True,
                    num_experts=E, moe_ffn_hidden_size=INTER)
    table = [m for m in mappings(None, arch) if ".experts." in m.mcore]

    def ctx(rank, size):
        return ShardCtx(rank, size, 10, 10, 2, 2, 3)
    return table, ctx, find_mapping


def test_fused_expert_slices_round_trip_at_etp2():
    table, ctx, find = _table()
    gen = torch.Generator().manual_seed(0)
    hub = {PRE + "gate_up_proj": torch.randn(E, H, 2 * INTER, generator=gen),
           PRE + "down_proj": torch.randn(E, INTER, H, generator=gen)}
    module = {k: v.transpose(1, 2).contiguous() for k, v in hub.items()}  # save_pretrained's
    for e in range(E):
        fc1 = f"decoder.layers.3.mlp.experts.local_experts.{e}.linear_fc1.weight"
        fc2 = f"decoder.layers.3.mlp.experts.linear_fc2.weight{e}"  # TE's grouped name
        m1, i1 = find(table, fc1)
        m2, i2 = find(table, fc2)
        for layout in (hub, module):
            r = _DictReader(layout)
            s1 = [m1.load(r, i1, ctx(k, 2)) for k in range(2)]
            s2 = [m2.load(r, i2, ctx(k, 2)) for k in range(2)]
            assert s1[0].shape == (INTER, H) and s2[0].shape == (H, INTER // 2)
            pieces = dict(m1.to_hf(torch.cat(s1), i1, ctx(0, 2))
                          + m2.to_hf(torch.cat(s2, 1), i2, ctx(0, 2)))
            assert torch.equal(pieces[f"{PRE}{e}.gate_proj.weight"],
                               hub[PRE + "gate_up_proj"][e, :, :INTER].t())
            assert torch.equal(pieces[f"{PRE}{e}.up_proj.weight"],
                               hub[PRE + "gate_up_proj"][e, :, INTER:].t())
            assert torch.equal(pieces[f"{PRE}{e}.down_proj.weight"],
                               hub[PRE + "down_proj"][e].t())


def test_export_fuses_pieces_into_hub_tensors(tmp_path):
    """Pieces spread over two shards (as two EP ranks write them) become the hub's fused
    tensors; the other tensors stay; index and file names are rewritten."""
    from safetensors.torch import load_file

    from mvlm.convert.hf_io import StreamingSafetensorsWriter, write_index
    from mvlm.models.qwen3_vl_moe.weights import fuse_experts

    gen = torch.Generator().manual_seed(1)
    gate_up = torch.randn(E, H, 2 * INTER, generator=gen)
    down = torch.randn(E, INTER, H, generator=gen)
    other = torch.randn(3, 5, generator=gen)
    files: dict[str, dict[str, torch.Tensor]] = {"a.safetensors": {"x.weight": other},
                                                  "b.safetensors": {}}
    for e in range(E):
        f = files["a.safetensors" if e < E // 2 else "b.safetensors"]
        f[f"{PRE}{e}.gate_proj.weight"] = gate_up[e, :, :INTER].t().contiguous()
        f[f"{PRE}{e}.up_proj.weight"] = gate_up[e, :, INTER:].t().contiguous()
        f[f"{PRE}{e}.down_proj.weight"] = down[e].t().contiguous()
    weight_map = {}
    for fname, ts in files.items():
        w = StreamingSafetensorsWriter(tmp_path / fname,
                                       [(k, v.dtype, list(v.shape)) for k, v in ts.items()])
        for k, v in ts.items():
            w.write(k, v)
            weight_map[k] = fname
        w.close()
    write_index(tmp_path, weight_map, 0)  # what the exporter writes for two files
    new_map = fuse_experts(tmp_path, weight_map)
    assert new_map == {"x.weight": "model.safetensors", PRE + "gate_up_proj": "model.safetensors",
                       PRE + "down_proj": "model.safetensors"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    out = load_file(tmp_path / "model.safetensors")
    assert torch.equal(out[PRE + "gate_up_proj"], gate_up)
    assert torch.equal(out[PRE + "down_proj"], down) and torch.equal(out["x.weight"], other)


def test_dense_qwen3_vl_weights_refused_by_name(tiny_ckpt, tmp_path):
    """A qwen3_vl_moe config.json over the dense Qwen3-VL's weights (same sizes, no experts):
    refused before any output, naming the first MoE tensor it lacks (layer 0's router)."""
    bad = tmp_path / "bad"
    shutil.copytree(tiny_ckpt("qwen3_vl_moe"), bad)
    shutil.copy(tiny_ckpt("qwen3_vl") / "model.safetensors", bad / "model.safetensors")
    out = tmp_path / "mc"
    p = run_mvlm(["convert", "--to", "mcore", "--model", str(bad), "--output", str(out)],
                 check=False)
    log = p.stderr + p.stdout
    assert p.returncode != 0 and not out.exists()
    assert re.search(r"'model\.language_model\.layers\.0\.mlp\.gate\.weight', is needed for "
                     r"decoder\.layers\.0\.mlp\.router\.weight", log), log[-3000:]
    assert "is this a qwen3_vl_moe checkpoint" in log


def test_expert_adapters_fuse_into_peft_target_parameters():
    """Per-expert LoRA factors (gate/up sharing A, as mvlm trains them) written in peft's
    ``target_parameters`` layout: peft itself, loading them onto fused [E, out, in] parameters,
    gives each expert's delta B @ A * alpha / r exactly; reading them back returns the pieces."""
    import peft
    from torch import nn

    from mvlm.models.qwen3_vl_moe.weights import fuse_peft_experts, split_peft_experts

    r, alpha, key = 2, 4, "base_model.model." + PRE[:-1]

    class Experts(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.zeros(E, 2 * INTER, H))
            self.down_proj = nn.Parameter(torch.zeros(E, H, INTER))

    tree = nn.Module()
    tree.model = nn.Module()
    tree.model.language_model = nn.Module()
    tree.model.language_model.layers = nn.ModuleList(nn.Module() for _ in range(4))
    tree.model.language_model.layers[3].mlp = nn.Module()
    tree.model.language_model.layers[3].mlp.experts = Experts()
    gen = torch.Generator().manual_seed(2)
    pieces = {}
    for e in range(E):
        a = torch.randn(r, H, generator=gen)
        pieces[f"{key}.{e}.gate_proj.lora_A.weight"] = a
        pieces[f"{key}.{e}.up_proj.lora_A.weight"] = a.clone()
        for k, shape in (("gate_proj.lora_B", (INTER, r)), ("up_proj.lora_B", (INTER, r)),
                         ("down_proj.lora_A", (r, INTER)), ("down_proj.lora_B", (H, r))):
            pieces[f"{key}.{e}.{k}.weight"] = torch.randn(*shape, generator=gen)
    mods = [f"{PRE}{e}.{k}" for e in range(E) for k in ("gate_proj", "up_proj", "down_proj")]
    fused, names = fuse_peft_experts(dict(pieces), {"modules": mods, "modules_to_save": []})
    assert names["modules"] == [] and names["parameters"] == ["mlp.experts.gate_up_proj",
                                                              "mlp.experts.down_proj"]
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=[],
                          target_parameters=names["parameters"])
    model = peft.get_peft_model(tree, cfg)
    peft.set_peft_model_state_dict(model, fused)
    outer = model.base_model.model.model.language_model.layers[3].mlp.experts
    deltas = {"down": outer.get_delta_weight("default"),
              "gate_up": outer.base_layer.get_delta_weight("default")}
    s = alpha / r
    for e in range(E):
        p = {k: pieces[f"{key}.{e}.{k}.weight"] for k in (
            "gate_proj.lora_A", "gate_proj.lora_B", "up_proj.lora_B", "down_proj.lora_A",
            "down_proj.lora_B")}
        want = torch.cat([p["gate_proj.lora_B"], p["up_proj.lora_B"]]) @ p["gate_proj.lora_A"]
        torch.testing.assert_close(deltas["gate_up"][e], want * s, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(deltas["down"][e], p["down_proj.lora_B"] @
                                   p["down_proj.lora_A"] * s, rtol=1e-6, atol=1e-6)
    back = split_peft_experts(fused, {"r": r, "target_parameters": names["parameters"]})
    assert sorted(back) == sorted(pieces)
    assert all(torch.equal(back[k], pieces[k]) for k in pieces)
