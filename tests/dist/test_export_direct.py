"""`mvlm convert --to hf` at TP>1 writes every rank's pieces in place: the files do not depend on
the layout, and nothing is gathered that a mapping can give as pieces.

One 4-rank launch (_export_direct_worker.py, gloo, CPU): the tiny Qwen2.5-VL (GQA attention with
q/k/v biases, a vocabulary of 1000 padded to 1024, a replicated ViT) is converted into Megatron
at TP2, then exported at TP1, TP2 and TP2 x PP2 with a small --max_shard_size, so the plan spans
several files and an index. The strongest check there is: every file of the three exports is
byte-identical (``filecmp.cmp(shallow=False)``), the TP1 export holds the original tensors, and
the per-rank counters show that at TP2 / TP2 x PP2 the bytes came from every writing rank's own
shards (nothing gathered; row-parallel weights swapped between the TP ranks so each writes
whole rows), each byte once. Qwen3-VL-MoE (experts fused in the HF layout, whose
mappings give no pieces) exported at TP2 (expert-TP 2) takes the gather-to-writer fallback and
still round-trips bit for bit.
"""
from __future__ import annotations

import filecmp
import json
from pathlib import Path

import pytest
from helpers import assert_same_tensors, launch_worker, load_all_safetensors

pytestmark = pytest.mark.dist

HERE = Path(__file__).resolve().parent
LAYOUTS = {"tp1": [], "tp2": ["--tp", "2"], "tp2pp2": ["--tp", "2", "--pp", "2"]}
SHARD = ["--max_shard_size", "200KB"]


def _data_bytes(d: Path) -> int:
    return sum(t.numel() * t.element_size() for t in load_all_safetensors(d).values())


@pytest.fixture(scope="module")
def exports(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("export_direct")
    dense, moe = tiny_ckpt("qwen2_5_vl"), tiny_ckpt("qwen3_vl_moe")

    def conv(name, to, src, layout, extra=()):
        return {"name": name, "argv": ["convert", "--to", to, "--model", str(src), "--output",
                                       str(out / name), *layout, *extra]}

    steps = [  # grouped by layout: process groups are rebuilt once per layout
        conv("dense_mcore", "mcore", dense, LAYOUTS["tp2"]),
        conv("dense_tp2", "hf", out / "dense_mcore", LAYOUTS["tp2"], SHARD),
        conv("moe_mcore", "mcore", moe, ["--ep", "2"]),
        conv("moe_tp2", "hf", out / "moe_mcore", LAYOUTS["tp2"]),
        conv("dense_tp1", "hf", out / "dense_mcore", LAYOUTS["tp1"], SHARD),
        conv("dense_tp2pp2", "hf", out / "dense_mcore", LAYOUTS["tp2pp2"], SHARD),
    ]
    spec = out / "spec.json"
    spec.write_text(json.dumps({"out": str(out / "stats.json"), "steps": steps}))
    p = launch_worker(HERE / "_export_direct_worker.py", 4, [spec], timeout=1500)
    print(p.stdout[-3000:])
    stats = {r["name"]: r["stats"] for r in json.loads((out / "stats.json").read_text())}
    return out, dense, moe, stats


def test_tp_exports_are_byte_identical_to_tp1(exports):
    out, dense, _, stats = exports
    ref = out / "dense_tp1"
    weights = sorted(p.name for p in ref.iterdir() if p.name.startswith("model"))
    assert len(weights) >= 3 and "model.safetensors.index.json" in weights, weights
    for lay in ("dense_tp2", "dense_tp2pp2"):
        got = sorted(p.name for p in (out / lay).iterdir() if p.name.startswith("model"))
        assert got == weights, (lay, got)
        for f in weights:
            assert filecmp.cmp(ref / f, out / lay / f, shallow=False), (lay, f)
        print(f"{lay}: {len(weights)} files byte-identical to the TP1 export's")
    assert assert_same_tensors(dense, ref) > 50


@pytest.mark.parametrize("lay, writers", [("dense_tp1", 1), ("dense_tp2", 2),
                                          ("dense_tp2pp2", 4)])
def test_every_byte_comes_from_its_own_rank_once(exports, lay, writers):
    """Nothing gathered; each byte written once (the counters add up to the files' data); at
    TP2 both TP ranks of the replica that speaks write (the other replica writes nothing), at
    TP2 x PP2 all four ranks."""
    out, _, _, stats = exports
    s = stats[lay]
    print(lay, [(r["direct_bytes"], r["gathered_bytes"], r["kernel_bytes"]) for r in s])
    assert all(r["gathered_bytes"] == 0 for r in s), s
    assert sum(r["direct_bytes"] for r in s) == _data_bytes(out / lay)
    assert sum(r["direct_bytes"] > 0 for r in s) == writers, s
    # row-parallel weights (o_proj, down_proj) left each TP rank as whole rows after the swap
    swapped = [r["swapped_bytes"] > 0 for r in s]
    assert sum(swapped) == (0 if writers == 1 else writers), s


def test_moe_fused_experts_fall_back_to_the_gather_and_round_trip(exports):
    out, _, moe, stats = exports
    s = stats["moe_tp2"]
    print("moe_tp2", [(r["direct_bytes"], r["gathered_bytes"]) for r in s])
    assert sum(r["gathered_bytes"] for r in s) > 0, s  # the fused experts' fallback ran
    assert sum(r["direct_bytes"] for r in s) > 0, s  # the rest did not
    assert sum(r["direct_bytes"] + r["gathered_bytes"] for r in s) == \
        _data_bytes(out / "moe_tp2")
    assert assert_same_tensors(moe, out / "moe_tp2") > 20
