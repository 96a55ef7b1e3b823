"""GRPOObjective's ``--dynamic_sample`` (DAPO) loop, in process: a scripted engine whose groups
have equal rewards for even prompt tokens and differing rewards for odd ones, a real reward
function, and a stub trainer whose loader hands out further prompt batches. Checked: the groups
kept (in order, re-indexed, with their own rewards), how many further batches were drawn, the
top-up from the earliest zero-std groups when ``--max_resample_times`` runs out, and the
metrics; no resample when every group already has signal, nor in evaluation."""
from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from mvlm.rl.flags import add_grpo_args, grpo_configs
from mvlm.rl.rewards import register
from mvlm.rl.rollout.base import Completion, RolloutGroup, SamplingParams
from mvlm.train.objectives import grpo


def first_token(completions, response_token_ids, **kwargs):
    assert completions == [str(ids[0]) for ids in response_token_ids]  # decoded by the trainer's
    return [float(ids[0]) for ids in response_token_ids]


class ScriptedEngine:
    """Two completions per prompt: [1], [1] for an even prompt token (zero std), [0], [1] for
    an odd one."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []

    def generate(self, prompts, params):
        self.calls.append([p.input_ids[0] for p in prompts])
        out = []
        for i, p in enumerate(prompts):
            toks = [1, 1] if p.input_ids[0] % 2 == 0 else [0, 1]
            out.append(RolloutGroup(i, [Completion(i, [t], [0.0], [0.0], "eos") for t in toks]))
        return out


def _batch(*tokens: int) -> dict:
    return {"input_ids": torch.tensor([[t] for t in tokens]),
            "attention_mask": torch.ones(len(tokens), 1, dtype=torch.bool)}


@pytest.fixture(scope="module", autouse=True)
def one_rank(tmp_path_factory):
    mine = not dist.is_initialized()
    if mine:
        f = tmp_path_factory.mktemp("pg") / "store"
        dist.init_process_group("gloo", init_method=f"file://{f}", rank=0, world_size=1)
    yield
    if mine:
        dist.destroy_process_group()


def _run(monkeypatch, first: dict, later: list[dict], max_resample_times: int,
         training: bool = True):
    register("first_token", first_token, origin="test_rl_dynamic_sample")
    p = argparse.ArgumentParser()
    add_grpo_args(p)
    ns = p.parse_args(["--dynamic_sample", "--reward_funcs", "first_token",
                       "--max_resample_times", str(max_resample_times)])
    cfgs = grpo_configs(ns, num_generations=2, max_completion_length=1)
    obj = grpo.GRPOObjective(cfgs, SamplingParams(num_generations=2, max_completion_length=1))
    obj.engine = ScriptedEngine()
    monkeypatch.setattr(grpo, "_dp", lambda: (1, 0, None))
    queue = list(later)
    tok = SimpleNamespace(decode=lambda ids, skip_special_tokens: " ".join(map(str, ids)))
    trainer = SimpleNamespace(
        step=0, next_batches=lambda: [queue.pop(0)],
        ddp_models=[SimpleNamespace(training=training)],
        data=SimpleNamespace(template=SimpleNamespace(tokenizer=tok)),
        bundle=SimpleNamespace(family=SimpleNamespace(media=(), is_vlm=False), hf_config=None))
    prompts, groups, res, metrics = obj._collect(trainer, [first])
    return obj, prompts, groups, res, metrics, queue


def test_keeps_groups_with_signal(monkeypatch):
    obj, prompts, groups, res, m, queue = _run(
        monkeypatch, _batch(2, 3), [_batch(4, 5), _batch(7, 9)], 3)
    assert obj.engine.calls == [[2, 3], [4, 5]] and len(queue) == 1  # one more batch drawn
    assert [p.input_ids for p in prompts] == [[3], [5]]
    assert [g.prompt_index for g in groups] == [0, 1]
    assert all(c.prompt_index == g.prompt_index for g in groups for c in g.completions)
    assert res.rewards_per_func[:, 0].tolist() == [0.0, 1.0, 0.0, 1.0]
    assert m == {"dynamic_sample/dropped_groups": 2.0,
                 "dynamic_sample/zero_std_groups_used": 0.0, "dynamic_sample/rollouts": 2.0}


def test_tops_up_when_retries_run_out(monkeypatch):
    obj, prompts, groups, res, m, _ = _run(
        monkeypatch, _batch(2, 4), [_batch(6, 8), _batch(10, 12)], 1)
    assert obj.engine.calls == [[2, 4], [6, 8]]  # 1 + --max_resample_times rollouts
    assert [p.input_ids for p in prompts] == [[2], [4]]  # the earliest zero-std groups
    assert m == {"dynamic_sample/dropped_groups": 4.0,
                 "dynamic_sample/zero_std_groups_used": 2.0, "dynamic_sample/rollouts": 2.0}


def test_no_resample_when_every_group_has_signal(monkeypatch):
    obj, prompts, _, res, m, queue = _run(monkeypatch, _batch(1, 3), [_batch(5, 7)], 3)
    assert obj.engine.calls == [[1, 3]] and len(queue) == 1
    assert [p.input_ids for p in prompts] == [[1], [3]]
    assert m["dynamic_sample/rollouts"] == 1.0 and m["dynamic_sample/dropped_groups"] == 0.0


def test_evaluation_does_not_resample(monkeypatch):
    """In evaluation the step's own prompts are scored as they are (more prompts would have to
    come from the train loader)."""
    obj, prompts, _, _, m, queue = _run(monkeypatch, _batch(2, 3), [_batch(5, 7)], 3,
                                        training=False)
    assert obj.engine.calls == [[2, 3]] and len(queue) == 1
    assert [p.input_ids for p in prompts] == [[2], [3]] and m["dynamic_sample/rollouts"] == 1.0
