"""Activation recompute changes memory, never numbers; --attn_impl eager equals sdpa.

One two-rank launch of ``_recompute_worker.py`` (single-rank references, TP2 and PP2; see its
docstring) on the tiny Qwen2.5-VL with 4 decoder layers. Tolerances (fp32, CPU): recompute vs
none <= 1e-6 on the loss and on every gradient element (recompute re-runs the same kernels on
the same inputs, so in practice it is bit-identical); eager vs sdpa logits, loss and gradients
<= 1e-6. Every variant must also have made the number of checkpoint calls its setting implies, so
a setting that silently did nothing cannot pass by matching the reference trivially.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
TOL = 1e-6
N_MICRO, LAYERS = 3, 4  # the worker's micro-batches per step and decoder layers


@pytest.fixture(scope="module")
def results(tmp_path_factory, tiny_ckpt):
    from helpers import launch_worker

    hf = tiny_ckpt("qwen2_5_vl", num_hidden_layers=4)
    out = tmp_path_factory.mktemp("recompute") / "results.json"
    launch_worker(HERE / "_recompute_worker.py", 2, [hf, out], timeout=900)
    return json.loads(out.read_text())


CASES = [(layout, v) for layout, vs in {
    "tp1": ["full_uniform_1", "full_uniform_2", "full_block_1", "full_block_3",
            "selective_default", "selective_attn_mlp_norm",
            "dropout_full_uniform_1", "dropout_selective_attn_mlp_norm"],
    "tp2": ["full_uniform_1", "full_uniform_2", "full_block_1", "full_block_3",
            "selective_default", "selective_attn_mlp_norm",
            "dropout_full_uniform_1", "dropout_selective_attn_mlp_norm"],
    "pp2": ["full_uniform_1", "full_uniform_2", "full_block_1",
            "selective_default", "selective_attn_mlp_norm"],
}.items() for v in vs]


def expected_calls(layout: str, variant: str) -> dict:
    """Megatron checkpoint calls (tensor_parallel.checkpoint, CheckpointWithoutOutput) per step."""
    per_stage = LAYERS // (2 if layout == "pp2" else 1)
    v = variant.removeprefix("dropout_")
    if v.startswith("full_uniform_"):
        ckpt, wo = per_stage // int(v.rsplit("_", 1)[1]), 0
    elif v.startswith("full_block_"):
        ckpt, wo = int(v.rsplit("_", 1)[1]), 0
    elif v == "selective_default":  # core_attn
        ckpt, wo = per_stage, 0
    else:  # core_attn + mlp via checkpoint, both norms via CheckpointWithoutOutput
        ckpt, wo = 2 * per_stage, 2 * per_stage
    return {"checkpoint": N_MICRO * ckpt, "without_output": N_MICRO * wo}


@pytest.mark.parametrize("layout,variant", CASES)
def test_recompute_matches_no_recompute(results, layout, variant):
    r = results[layout][variant]
    assert r["calls"] == expected_calls(layout, variant), r
    print(f"{layout} {variant}: |dloss| {r['dloss']:.2e} max|dgrad| {r['dgrad']:.2e} "
          f"over {r['n_grads']} grads (max|g| {r['max_abs_grad']:.2e})")
    assert r["n_grads"] > 10 and r["max_abs_grad"] > 1e-3, r  # gradients exist and are not 0
    assert r["dloss"] <= TOL and r["dgrad"] <= TOL, r


@pytest.mark.parametrize("layout", ["tp1", "tp2"])
def test_dropout_is_live_so_the_replay_check_means_something(results, layout):
    assert results[layout]["dropout_effect"]["dloss"] > 1e-3, results[layout]


def test_eager_equals_sdpa_and_the_kernel_is_the_one_asked_for(results):
    r = results["tp1"]["eager_vs_sdpa"]
    print(f"eager vs sdpa: max|dlogits| {r['dlogits']:.2e} |dloss| {r['dloss']:.2e} "
          f"max|dgrad| {r['dgrad']:.2e}")
    assert r["kernels_sdpa"] == ["sdpa"] and r["kernels_eager"] == ["eager"], r
    assert r["dlogits"] <= TOL and r["dloss"] <= TOL, r
    assert r["dgrad"] <= TOL, r
