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


PLUGIN = '''from swift.plugin import ORM, orms


class EvenTokens(ORM):
    def __call__(self, completions, response_token_ids, **kwargs):
        return [sum(t % 2 == 0 for t in ids) / max(1, len(ids)) for ids in response_token_ids]


orms['even_tokens'] = EvenTokens
'''


@pytest.mark.timeout(900)
def test_grpo_colocate_through_trainer(tiny_ckpt, tmp_path):
    """GRPO colocate mode through the real command line and Trainer (one rank, fp32), the engine
    stood in for (see _colocate_grpo_worker.py): 3 steps, one sync before every rollout (the
    policy changed), each read back equal, sleep level 1 around every rollout, and engine vs
    trainer token_mult_prob_error ~ 1 at every step, i.e. the engine sampled from the policy
    the trainer had at that step."""
    hf = tiny_ckpt("qwen2")
    (tmp_path / "plugin.py").write_text(PLUGIN)
    data = tmp_path / "rl.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}]}) + "\n"
                            for q in ("Count to five.", "Name a colour.", "2+2?", "Say hi.")))
    out = tmp_path / "out"
    argv = ["--model", str(hf), "--dataset", str(data),
            "--external_plugins", str(tmp_path / "plugin.py"), "--reward_funcs", "even_tokens",
            "--num_generations", "4", "--max_completion_length", "6", "--temperature", "1.0",
            "--top_k", "3", "--top_p", "1.0", "--beta", "0", "--use_vllm", "true",
            "--vllm_mode", "colocate", "--sleep_level", "1", "--offload_model", "true",
            "--weight_sync_bucket_mb", "0.05", "--check_weight_sync", "true",
            "--torch_dtype", "float32", "--micro_batch_size", "2", "--global_batch_size", "2",
            "--lr", "5e-3", "--lr_decay_style", "constant", "--lr_warmup_iters", "0",
            "--max_length", "128", "--seed", "0", "--train_iters", "3", "--output_dir",
            str(out), "--report_to", "none", "--disable_tqdm", "true"]
    spec = {"argv": argv, "events_out": str(tmp_path / "events.json")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    p = launch_worker(HERE / "_colocate_grpo_worker.py", 1, [tmp_path / "spec.json"],
                      timeout=840, expect=None, plain_single=True)
    log = p.stdout + p.stderr
    recs = [json.loads(x) for x in (out / "logging.jsonl").read_text().splitlines() if x.strip()]
    recs = [r for r in recs if "token_mult_prob_error" in r]
    print("token_mult_prob_error", [r["token_mult_prob_error"] for r in recs])
    assert [r["step"] for r in recs] == [1, 2, 3]
    for r in recs:
        assert 1.0 <= r["token_mult_prob_error"] <= 1.00001, r
    syncs = [ln for ln in log.splitlines() if "weight sync -> colocated vLLM" in ln]
    assert len(syncs) == 3 and all("read back equal" in ln for ln in syncs), syncs
    assert [f"version {v} at step {s}" in ln for ln, v, s in zip(syncs, (1, 2, 3), (0, 1, 2))] \
        == [True] * 3, syncs
    got = json.loads((tmp_path / "events.json").read_text())
    assert got["events"] == ["sleep(1)"] + ["wake_up(weights)", "wake_up(kv_cache)",
                                            "sleep(1)"] * 3
    assert got["moved"] > 1e-3, got["moved"]  # the policy the engine matched had trained
