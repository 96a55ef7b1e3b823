"""The rollout server's protocol without vLLM: ``RolloutService`` behind its real HTTP front, with
an in-memory engine pool standing in for the vLLM engines, driven by the real client
(``VLLMServerEngine``). Runs everywhere (CI has no vLLM venv); the same paths against real vLLM
are in tests/e2e/test_vllm_server.py.

Checked: buckets never exceed --weight_sync_bucket_mb unless one tensor alone does; every tensor
reaches the engine once; the prefix cache is reset on finish and the version bumps; a dropped /
renamed / mis-shaped / duplicated tensor and a manifest that disagrees with the checkpoint fail
naming the tensor and leave the engine stale (generate refused) until a complete sync;
--check_weight_sync catches an engine whose weights differ; a dead server -> a message naming it.
"""
from __future__ import annotations

import threading
from http.server import ThreadingHTTPServer

import pytest
import torch
from safetensors.torch import load_file

from mvlm.rl.rollout.base import RolloutPrompt, SamplingParams
from mvlm.rl.rollout.server import RolloutServerConfig, RolloutService, _make_handler
from mvlm.rl.rollout.vllm_server import (
    RolloutServerError,
    VLLMServerConfig,
    VLLMServerEngine,
    WeightSyncMismatch,
)


class MemoryPool:
    """Engine pool double: keeps the loaded tensors, records calls, 'generates' a fixed reply."""

    def __init__(self, weights: dict[str, torch.Tensor]) -> None:
        self.weights = {n: t.clone() for n, t in weights.items()}
        self.calls: list[str] = []
        self.loaded: list[list[str]] = []
        self.corrupt: str | None = None

    def sync_begin(self):
        self.calls.append("begin")

    def load(self, tensors):
        self.loaded.append([n for n, _ in tensors])
        for n, t in tensors:
            self.weights[n] = t.clone()

    def sync_finish(self):
        self.calls.append("finish")

    def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")

    def read(self, names):
        out = {n: self.weights[n].clone() for n in names}
        if self.corrupt in out:
            out[self.corrupt].view(-1)[0] += 1.0
        return out

    def generate(self, prompts, sampling):
        n = sampling["num_generations"]
        return [[{"token_ids": [1, 2], "logprobs": [-0.5, -0.25], "sampling_logprobs": [0, 0],
                  "stop_reason": "length"}] * n for _ in prompts]


@pytest.fixture
def served(tiny_ckpt):
    hf = tiny_ckpt("qwen2")
    weights = load_file(hf / "model.safetensors")
    pool = MemoryPool(weights)
    service = RolloutService(RolloutServerConfig(model=str(hf)), pool)
    service.dtype = torch.float32
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(service))
    t = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield httpd.server_address[1], pool, weights, service, httpd
    httpd.shutdown()
    httpd.server_close()


def _engine(port, **kw) -> VLLMServerEngine:
    return VLLMServerEngine(VLLMServerConfig(vllm_server_port=port, vllm_server_timeout=10, **kw))


def _perturbed(weights):
    g = torch.Generator().manual_seed(0)
    return {n: t + torch.randn(t.shape, generator=g) for n, t in weights.items()}


def test_sync_buckets_manifest_and_version(served):
    port, pool, weights, service, _ = served
    eng = _engine(port, weight_sync_bucket_mb=0.05, check_weight_sync=True)
    new = _perturbed(weights)
    assert eng.load_weights(sorted(new.items())) == 1
    ls = eng.last_sync
    limit = 0.05 * 2**20
    largest = max(t.numel() * 4 for t in new.values())
    assert ls["buckets"] >= 3 and ls["tensors"] == len(new) == ls["checked_tensors"]
    assert ls["max_bucket_bytes"] <= max(limit, largest) + 4096
    # a bucket over the limit holds exactly one tensor (the one that alone exceeds it)
    sizes = {n: t.numel() * 4 for n, t in new.items()}
    for names in pool.loaded:
        if sum(sizes[n] for n in names) > limit:
            assert len(names) == 1, names
    flat = [n for names in pool.loaded for n in names]
    assert sorted(flat) == sorted(new)  # every tensor once
    assert all(torch.equal(pool.weights[n], new[n]) for n in new)
    assert pool.calls == ["begin", "finish", "reset_prefix_cache"]
    assert service.weight_version == 1 and service.stale is None
    g = eng.generate([RolloutPrompt([5, 6])], SamplingParams(num_generations=2))
    assert [c.token_ids for c in g[0].completions] == [[1, 2], [1, 2]]


@pytest.mark.parametrize("fault", ["drop", "rename", "shape", "twice"])
def test_faulty_sync_names_tensor_and_goes_stale(served, fault):
    port, pool, weights, service, _ = served
    eng = _engine(port, weight_sync_bucket_mb=0.05)
    victim = "model.layers.1.mlp.down_proj.weight"
    items = []
    for n, t in sorted(weights.items()):
        if n == victim:
            if fault == "drop":
                continue
            if fault == "rename":
                n = n.replace("down_proj", "down_projection")
            if fault == "shape":
                t = t[:, :-1]
            if fault == "twice":
                items.append((n, t))
        items.append((n, t))
    want = {"drop": f"never arrived: ['{victim}']",
            "rename": "down_projection.weight is not in the manifest",
            "shape": f"{victim} arrived as [128, 255] float32 but the manifest says [128, 256]",
            "twice": f"tensor {victim} arrived twice"}[fault]
    with pytest.raises(RolloutServerError, match=want.replace("[", r"\[").replace("]", r"\]")):
        eng.load_weights(items)
    assert service.stale and service.sync is None
    assert pool.calls[-1] == "finish"  # the engines' reload was closed
    with pytest.raises(RolloutServerError, match="stale"):
        eng.generate([RolloutPrompt([5])], SamplingParams())
    eng.load_weights(sorted(weights.items()))  # a complete sync heals it
    assert service.stale is None
    eng.generate([RolloutPrompt([5])], SamplingParams())


def test_manifest_must_match_checkpoint(served):
    port, pool, weights, service, _ = served
    eng = _engine(port)
    man = [{"name": n, "shape": list(t.shape), "dtype": "float32"}
           for n, t in weights.items() if n != "model.norm.weight"]
    with pytest.raises(RolloutServerError, match=r"missing \['model.norm.weight'\]"):
        eng.load_weights(iter(()), manifest=man)
    man.append({"name": "model.norm.weight", "shape": [7], "dtype": "float32"})
    with pytest.raises(RolloutServerError, match=r"model.norm.weight: \[7\] vs served \[128\]"):
        eng.load_weights(iter(()), manifest=man)
    assert pool.calls == []  # refused before the engines were touched


def test_check_weight_sync_catches_engine_difference(served):
    port, pool, weights, service, _ = served
    pool.corrupt = "model.layers.0.self_attn.q_proj.weight"
    eng = _engine(port, check_weight_sync=True)
    with pytest.raises(RolloutServerError, match=r"check_weight_sync.*q_proj.weight"):
        eng.load_weights(sorted(weights.items()))
    assert issubclass(WeightSyncMismatch, RolloutServerError)


def test_dead_server_gives_message(served):
    port, pool, weights, service, httpd = served
    eng = _engine(port)
    httpd.shutdown()
    httpd.server_close()
    with pytest.raises(RolloutServerError, match=rf"127\.0\.0\.1:{port} is unreachable"):
        eng.generate([RolloutPrompt([5])], SamplingParams())
