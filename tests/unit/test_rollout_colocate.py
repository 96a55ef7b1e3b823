"""GRPO colocate mode (``--vllm_mode colocate``) orchestration, against an in-process stand-in
for ``vllm.LLM`` (tests/fake_vllm.py) because vLLM cannot run colocated on CPU.

What is pinned down here (one process, no Megatron): the order of sleep / wake / offload /
sync / prefix-cache reset / generate calls around a rollout for each ``--sleep_level``; that a
sync hands every HF tensor to the engine exactly once, equal to the trainer's, in buckets within
``--weight_sync_bucket_mb``; manifest failures (dropped, renamed, mis-shaped, duplicated tensor)
naming the tensor and leaving the engine stale until a complete sync; ``--check_weight_sync``
catching an engine that holds other weights; the flags and the CPU refusal. The multi-rank stream
(PP2: owners gather, rank 0 buckets and broadcasts) is tests/dist/test_colocate_sync.py.
"""
from __future__ import annotations

import argparse
import sys
import types
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from fake_vllm import FakeLLM, FakeOptimizer, fake_ddp, greedy_chain, install_fake_vllm_module

from mvlm.rl.rollout.base import RolloutPrompt, SamplingParams
from mvlm.rl.rollout.colocate import ColocateConfig, ColocateEngine, ColocateError

BUCKET_MB = 0.02


@pytest.fixture
def hf(tiny_ckpt):
    return tiny_ckpt("qwen2")


@pytest.fixture(autouse=True)
def _fakes(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", install_fake_vllm_module())
    tuners = types.ModuleType("mvlm.tuners.model")  # no LoRA here; avoids importing Megatron
    tuners.adapters = lambda bundle: []
    tuners.merge_adapters = tuners.unmerge_adapters = None  # never called without adapters
    monkeypatch.setitem(sys.modules, "mvlm.tuners.model", tuners)


def _policy(hf, scale: float) -> dict[str, torch.Tensor]:
    """The trainer's HF tensors: the checkpoint, scaled (a visible change of every tensor)."""
    return {n: t * scale for n, t in FakeLLM(hf).weights.items()}


def _engine(hf, events, policy: dict, corrupt=None, **cfg):
    trainer = SimpleNamespace(src_dir=hf, pad_id=0, step=0, skipped=0, bundle=None,
                              ddp_models=[fake_ddp(events)], optimizer=FakeOptimizer(events))
    llm = FakeLLM(hf, events=events, corrupt=corrupt)
    eng = ColocateEngine(ColocateConfig(weight_sync_bucket_mb=BUCKET_MB, **cfg), trainer,
                         llm=llm, group=None)
    eng._policy_steps = lambda bundle: _steps(policy)
    return eng, trainer, llm


def _steps(policy: dict):
    for n, t in policy.items():
        yield [(n, t.dtype, list(t.shape))], [(n, t)]


PROMPTS = [RolloutPrompt([5, 9, 3]), RolloutPrompt([7])]
GREEDY = SamplingParams(num_generations=2, max_completion_length=4, temperature=0.0)


def _rollout_events(events: list, start: int) -> list[str]:
    """The call log from ``start``, one entry per distinct call run (load x k -> load)."""
    out: list[str] = []
    for e in events[start:]:
        if not out or out[-1] != e:
            out.append(e)
    return out


@pytest.mark.parametrize("level", [0, 1, 2])
def test_rollout_call_order_and_weights(hf, level):
    events: list = []
    policy = _policy(hf, 1.5)
    eng, trainer, llm = _engine(hf, events, policy, sleep_level=level, offload_model=True,
                                offload_optimizer=True, check_weight_sync=True)
    assert events == ([f"sleep({level})"] if level else [])  # memory to the trainer at start
    start = len(events)
    eng.before_rollout(trainer)
    groups = eng.generate(PROMPTS, GREEDY)
    wake_w, wake_kv, sleep = (["wake_up(weights)"], ["wake_up(kv_cache)"],
                              [f"sleep({level})"]) if level else ([], [], [])
    assert _rollout_events(events, start) == [
        *wake_w, "sync_begin", "load_weights", "sync_finish", "reset_prefix_cache",
        "read_weights", "offload_model(params=True,grads=True)", "offload_optimizer",
        *wake_kv, "generate", *sleep, "restore_optimizer",
        "reload_model(params=True,grads=True)"]
    # every HF tensor of the checkpoint exactly once, equal to the trainer's, in bounded buckets
    loaded = [(n, t) for b in llm.buckets for n, t in b]
    assert Counter(n for n, _ in loaded) == Counter(list(policy))
    assert all(torch.equal(t, policy[n]) for n, t in loaded)
    limit = BUCKET_MB * 2**20
    sizes = [sum(t.numel() * t.element_size() for _, t in b) for b in llm.buckets]
    for b, size in zip(llm.buckets, sizes):
        assert size <= limit or len(b) == 1, (size, [n for n, _ in b])
    assert len(llm.buckets) >= 3 and eng.last_sync["max_bucket_bytes"] == max(sizes)
    assert eng.last_sync["checked_tensors"] == len(policy)
    # the rollout came from the synced weights (not the start-up checkpoint's)
    for i, g in enumerate(groups):
        want, lps = greedy_chain(policy, list(PROMPTS[i].input_ids), 4)
        assert [c.token_ids for c in g.completions] == [want, want]
        assert g.completions[0].logprobs == pytest.approx(lps, abs=1e-6)
    _, old = greedy_chain(FakeLLM(hf).weights, [7], 4)
    assert max(abs(a - b) for a, b in zip(old, groups[1].completions[0].logprobs)) > 1e-3
    # the same policy again: level 0/1 keep the engine's weights (no sync); level 2 freed them
    start = len(events)
    eng.before_rollout(trainer)
    assert ("sync_begin" in events[start:]) == (level == 2)
    eng.generate(PROMPTS, GREEDY)
    # an applied optimizer step: synced again (a skipped one does not change the policy)
    trainer.step, trainer.skipped = 2, 1
    start = len(events)
    eng.before_rollout(trainer)
    assert "sync_begin" in events[start:] and eng.weight_version == (3 if level == 2 else 2)


@pytest.mark.parametrize("fault", ["dropped", "renamed", "misshaped", "twice"])
def test_manifest_faults_name_the_tensor_and_leave_engine_stale(hf, fault):
    events: list = []
    policy = _policy(hf, 0.5)
    eng, trainer, llm = _engine(hf, events, policy)
    name = "model.layers.1.mlp.down_proj.weight"
    bad = dict(policy)
    if fault == "dropped":
        del bad[name]
        want = f"1 manifest tensors never arrived: ['{name}']"
    elif fault == "renamed":
        bad["model.layers.1.mlp.down_projection.weight"] = bad.pop(name)
        want = "tensor model.layers.1.mlp.down_projection.weight is not in the manifest"
    elif fault == "misshaped":
        bad[name] = bad[name][:, :-1]
        shape = list(policy[name].shape)
        want = (f"tensor {name} arrived as {[shape[0], shape[1] - 1]} float32 but the "
                f"manifest says {shape} float32")
    eng._policy_steps = lambda bundle: (
        _steps(bad) if fault != "twice"
        else (s for part in (_steps(bad), _steps({name: bad[name]})) for s in part))
    if fault == "twice":
        want = f"tensor {name} arrived twice"
    with pytest.raises(ColocateError, match="weight sync into the colocated vLLM engine failed"
                       ) as e:
        eng.before_rollout(trainer)
    assert want in str(e.value)
    assert events[-2:] == ["sync_finish", "reset_prefix_cache"]  # the reload is closed
    if fault != "dropped":  # refused before loading: the bad tensor never reached the engine
        assert all(n != name or fault == "twice" for b in llm.buckets for n, _ in b)
    with pytest.raises(ColocateError, match="stale"):
        eng.generate(PROMPTS, GREEDY)
    eng._policy_steps = lambda bundle: _steps(policy)  # a complete sync restores it
    eng.before_rollout(trainer)
    g = eng.generate(PROMPTS[:1], GREEDY)
    assert g[0].completions[0].token_ids == greedy_chain(policy, [5, 9, 3], 4)[0]


def test_check_weight_sync_catches_engine_holding_other_weights(hf):
    name = "model.layers.0.self_attn.q_proj.weight"
    eng, trainer, _ = _engine(hf, [], _policy(hf, 2.0), corrupt=name, check_weight_sync=True)
    with pytest.raises(ColocateError, match=rf"--check_weight_sync: 1 tensors read back from "
                       rf"the engine differ from what was loaded: \['{name}'\]"):
        eng.before_rollout(trainer)
    assert eng.stale


def test_image_prompts_refused(hf):
    eng, trainer, _ = _engine(hf, [], _policy(hf, 1.0))
    eng.before_rollout(trainer)
    with pytest.raises(ColocateError, match="takes token-id prompts only"):
        eng.generate([RolloutPrompt([1], media={"pixel_values": torch.zeros(1)})], GREEDY)


def _ns(*argv: str) -> argparse.Namespace:
    from mvlm.rl.grpo_cli import grpo_parser

    return grpo_parser().parse_known_args(list(argv))[0]


def test_flags_and_cpu_refusal(monkeypatch):
    from mvlm.rl.grpo_cli import colocate_config, grpo_objective

    cfg = colocate_config(_ns("--use_vllm", "true", "--sleep_level", "2", "--offload_model",
                              "--vllm_gpu_memory_utilization", "0.4",
                              "--weight_sync_bucket_mb", "64", "--check_weight_sync", "true"))
    assert (cfg.sleep_level, cfg.offload_model, cfg.offload_optimizer,
            cfg.vllm_gpu_memory_utilization, cfg.weight_sync_bucket_mb,
            cfg.check_weight_sync) == (2, True, False, 0.4, 64.0, True)
    d = colocate_config(_ns("--use_vllm", "true"))  # ms-swift's defaults
    assert (d.sleep_level, d.vllm_gpu_memory_utilization, d.weight_sync_bucket_mb) == (0, 0.9,
                                                                                       512.0)
    with pytest.raises(SystemExit):
        _ns("--sleep_level", "3")
    with pytest.raises(ValueError, match="--vllm_gpu_memory_utilization must be in"):
        colocate_config(_ns("--use_vllm", "true", "--vllm_gpu_memory_utilization", "1.5"))
    with pytest.raises(ValueError, match="--sleep_level --offload_optimizer: colocate-mode "
                       "flags, used only with --use_vllm true --vllm_mode colocate"):
        grpo_objective(_ns("--use_vllm", "true", "--vllm_mode", "server", "--sleep_level", "1",
                           "--offload_optimizer"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError) as e:
        grpo_objective(_ns("--use_vllm", "true", "--weight_sync_bucket_mb", "8"))
    msg = str(e.value)
    for part in ("needs GPUs and this machine has none", "no sleep mode", "--vllm_mode server",
                 "cannot be imported beside the trainer's torch"):
        assert part in msg, msg
