"""``mvlm.convert.stream.iter_hf_tensors``: the sharded model back as (HF name, full tensor).

One torchrun launch (2 ranks, gloo, CPU, fp32) runs three layouts of tiny checkpoints: Qwen2-VL
at TP2 (fused qkv / gate-up de-interleaved, ViT), Qwen2 at PP2 (tied embeddings: the last stage's
output copy must not appear), Qwen3-MoE at TP2 x EP2 with expert-TP 1 (dense weights gathered
over TP, experts owned by one rank each: in "rank0" mode rank 1 both joins rank 0's dense gathers
and sends its own experts, the interleaving that deadlocks if the ranks do not follow one global
order). Each layout streams in every receivers mode and also cast to bf16. Checked:

* every HF tensor of the checkpoint is yielded, torch.equal to the original safetensors tensor
  (same dtype and shape; bf16 mode: equal to the original cast to bf16);
* "group_first" and "rank0": each exactly once across all ranks ("rank0": all on rank 0);
  "owners": on every rank holding a shard (both TP ranks for dense weights, one rank per expert
  or per pipeline stage otherwise);
* bounded memory: the stream's peak held elements <= 2 x the largest full parameter (the
  shards of one parameter plus their concatenation), and no earlier yielded tensor is still
  alive when the next one arrives (the generator keeps nothing the consumer dropped).
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

CASES = {
    "qwen2_vl_tp2": ("qwen2_vl", {"tp": 2}),
    "qwen2_pp2": ("qwen2", {"pp": 2}),
    "qwen3_moe_tp2_ep2": ("qwen3_moe", {"tp": 2, "ep": 2, "etp": 1}),
}


def _owners_expected(case: str, name: str) -> int:
    if case == "qwen2_pp2":
        return 1
    if case == "qwen3_moe_tp2_ep2" and ".mlp.experts." in name:
        return 1  # each expert lives on one EP rank, not split (expert-TP 1)
    return 2


@pytest.mark.timeout(900)
def test_iter_hf_tensors_modes_layouts(tiny_ckpt, tmp_path):
    from helpers import launch_worker

    spec = {"out": str(tmp_path / "out.json"),
            "cases": {k: {"hf": str(tiny_ckpt(fam)), "layout": lay}
                      for k, (fam, lay) in CASES.items()}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    launch_worker(HERE / "_stream_worker.py", 2, [tmp_path / "spec.json"], timeout=840,
                  expect=None, tail=11000)
    ranks = json.loads(Path(spec["out"]).read_text())
    for case in CASES:
        r0 = ranks[0][case]
        want = {k for k in r0["keys"] if not (r0["tied"] and k.endswith("lm_head.weight"))}
        assert len(want) > 10, want
        for mode in ("group_first", "owners", "rank0", "group_first_bf16"):
            per_rank = [r[case][mode] for r in ranks]
            for i, got in enumerate(per_rank):
                assert got["bad"] == [], (case, mode, i, got["bad"][:5])
                assert got["alive_max"] == 0, (case, mode, i, got["alive_max"])
                largest = ranks[i][case]["largest_param"]
                assert got["peak"] <= 2 * largest, (case, mode, i, got["peak"], largest)
                assert got["tensors"] == len(got["names"]), (case, mode, i)
            count = Counter(n for got in per_rank for n in got["names"])
            assert set(count) == want, (case, mode, sorted(set(count) ^ want)[:10])
            if mode == "owners":
                wrong = {n: c for n, c in count.items() if c != _owners_expected(case, n)}
                assert not wrong, (case, sorted(wrong.items())[:10])
            else:
                assert set(count.values()) == {1}, (case, mode, count.most_common(3))
            if mode == "rank0":
                assert per_rank[1]["names"] == [], (case, per_rank[1]["names"][:5])
            peaks = [g["peak"] for g in per_rank]
            print(f"{case} {mode}: {sum(count.values())} tensors yielded "
                  f"({len(want)} distinct), peak held {peaks} elements, largest param "
                  f"{[r[case]['largest_param'] for r in ranks]}")
