"""GRPO colocate mode's weight sync across ranks (PP2, 2 ranks, gloo): the real weight stream
into an in-process stand-in for vllm.LLM on each rank (tests/dist/_colocate_worker.py).

Shows: both pipeline stages' tensors reach the engine of *both* ranks, each HF tensor exactly
once and equal to the trainer's, in buckets within --weight_sync_bucket_mb (the same cuts on
every rank); sleep level 1 ordering (weights woken before the sync, KV cache after, slept after
the rollout); both ranks return the same rollout, generated from the synced weights; a manifest
fault, and an engine failure on rank 1 alone, raise the same error on both ranks (no hang) and
leave the engine stale until a complete sync.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import launch_worker

HERE = Path(__file__).resolve().parent


@pytest.mark.timeout(900)
def test_colocate_pp2_sync_rollout_fault(tiny_ckpt, tmp_path):
    from safetensors import safe_open

    hf = tiny_ckpt("qwen2")
    names = set()
    for f in hf.glob("*.safetensors"):
        with safe_open(f, "pt") as s:
            names |= set(s.keys())
    spec = {"hf": str(hf), "bucket_mb": 0.02, "out": str(tmp_path / "out.json")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    launch_worker(HERE / "_colocate_worker.py", 2, [tmp_path / "spec.json"], timeout=840)
    recs = json.loads(Path(spec["out"]).read_text())
    assert len(recs) == 2
    for rank, r in enumerate(recs):
        assert r["group_size"] == 2
        assert r["loaded"] == dict.fromkeys(names, 1), (rank, r["loaded"])
        assert r["unequal"] == [], (rank, r["unequal"])
        for size, n in zip(r["bucket_bytes"], r["bucket_lens"]):
            assert size <= r["limit"] or n == 1, (rank, size, n)
        assert len(r["bucket_bytes"]) >= 3
        assert r["last_sync"]["checked_tensors"] == len(names)
        ev = [e for i, e in enumerate(r["events"]) if i == 0 or r["events"][i - 1] != e]
        assert ev == ["sleep(1)", "wake_up(weights)", "sync_begin", "load_weights",
                      "sync_finish", "reset_prefix_cache", "read_weights",
                      "wake_up(kv_cache)", "generate", "sleep(1)"], (rank, ev)
        assert r["tokens"] == r["want_tokens"] == recs[0]["tokens"]
        assert "tensor model.layers.1.mlp.down_proj.weight arrived as" in r["fault"], r["fault"]
        assert r["fault"] == recs[0]["fault"]
        assert "stale" in r["stale_generate"]
        assert r["engine_fault"] == recs[0]["engine_fault"]
        assert "rank 1: loading bucket" in r["engine_fault"] and \
            "no parameter for model.layers.1.mlp.down_proj.weight" in r["engine_fault"] and \
            "rank 0:" not in r["engine_fault"], r["engine_fault"]
        assert r["after_fault_version"] == 2
        assert r["after_fault_tokens"] == r["want_tokens"][1][0]
    # the same bucket cuts on both ranks (each rank loaded the whole model)
    assert recs[0]["bucket_lens"] == recs[1]["bucket_lens"]
