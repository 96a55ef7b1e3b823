"""An in-process stand-in for ``vllm.LLM`` with exactly the methods colocate mode calls
(``collective_rpc`` with mvlm's worker functions, ``sleep``, ``wake_up``, ``reset_prefix_cache``,
``generate``), for testing :mod:`mvlm.rl.rollout.colocate` where vLLM cannot be imported.

Why a fake: vLLM's CPU build lives in its own venv with another torch, so colocate mode cannot
run on CPU at all. The fake records every call in order and every tensor it is given, holds the
weights it was loaded with (plain HF names), refuses calls that would be wrong on a real engine
(loading into or reading slept weights, generating with a slept KV cache or during a reload,
generating after a reload without a prefix-cache reset), and "generates" greedily from its own
weights, so a rollout shows which weights the engine really holds: next token = argmax of
``lm_head @ embed_tokens[last token]`` (``embed_tokens`` when the head is tied).
"""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import torch


def install_fake_vllm_module() -> types.ModuleType:
    """A ``vllm`` module with the two classes mvlm's engine code builds requests from."""
    mod = types.ModuleType("vllm")
    mod.SamplingParams = lambda **kw: SimpleNamespace(**kw)
    mod.TokensPrompt = lambda prompt_token_ids: SimpleNamespace(
        prompt_token_ids=list(prompt_token_ids))
    sys.modules["vllm"] = mod
    return mod


def greedy_chain(weights: dict[str, torch.Tensor], prompt: list[int], n: int
                 ) -> tuple[list[int], list[float]]:
    """The fake model's greedy tokens and their log-probs (float64 math)."""
    emb = weights["model.embed_tokens.weight"].double()
    head = weights.get("lm_head.weight", weights["model.embed_tokens.weight"]).double()
    toks, lps, last = [], [], prompt[-1]
    for _ in range(n):
        lp = torch.log_softmax(head @ emb[last], -1)
        last = int(lp.argmax())
        toks.append(last)
        lps.append(float(lp[last]))
    return toks, lps


class FakeLLM:
    """See the module docstring. ``events``: the call log; ``buckets``: [(name, tensor)] per
    ``load_weights`` call; ``corrupt``: a tensor name whose loaded value the fake alters (to
    show that ``--check_weight_sync`` catches an engine holding other weights)."""

    def __init__(self, hf_dir: str | Path, dtype: torch.dtype = torch.float32,
                 events: list | None = None, corrupt: str | None = None) -> None:
        from safetensors.torch import load_file

        d = Path(hf_dir)
        self.hf_dir = d
        self.weights: dict[str, torch.Tensor] = {}
        for f in sorted(d.glob("*.safetensors")):
            self.weights.update({n: t.to(dtype) for n, t in load_file(f).items()})
        cfg = json.loads((d / "config.json").read_text())
        vocab = int(cfg.get("vocab_size") or cfg["text_config"]["vocab_size"])
        self.llm_engine = SimpleNamespace(model_config=SimpleNamespace(
            dtype=dtype, get_vocab_size=lambda: vocab))
        self.events = events if events is not None else []
        self.buckets: list[list[tuple[str, torch.Tensor]]] = []
        self.awake = {"weights", "kv_cache"}
        self.reloading = False
        self.cache_fresh = True  # False between a reload and reset_prefix_cache
        self.corrupt = corrupt
        self.fail_load: str | None = None  # a tensor name whose load raises (engine failure)

    def collective_rpc(self, method, args=(), kwargs=None):
        op = method.__name__.strip("_").removesuffix("_rpc")
        self.events.append(op)
        if op in ("load_weights", "read_weights") and "weights" not in self.awake:
            raise RuntimeError(f"{op} while the engine's weights sleep")
        if op == "sync_begin":
            assert not self.reloading, "sync_begin twice"
            self.reloading = True
            return [None]
        if op == "load_weights":
            assert self.reloading, "load_weights outside a layer-wise reload"
            (tensors,) = args
            self.buckets.append([(n, t.detach().clone()) for n, t in tensors])
            for n, t in tensors:
                if n not in self.weights or n == self.fail_load:
                    raise KeyError(f"no parameter for {n}")
                self.weights[n] = t.detach().clone()
                if n == self.corrupt:
                    self.weights[n].view(-1)[0] += 1
            return [len(tensors)]
        if op == "sync_finish":
            assert self.reloading, "sync_finish without sync_begin"
            self.reloading = False
            self.cache_fresh = False
            return [None]
        if op == "read_weights":
            (names,) = args
            return [{n: (self.weights[n].clone(), None) for n in names}]
        raise AssertionError(f"unexpected collective_rpc {op}")

    def sleep(self, level: int = 1) -> None:
        self.events.append(f"sleep({level})")
        self.awake.clear()
        if level == 2:  # weights discarded: garbage until loaded again
            self.weights = {n: torch.full_like(t, float("nan")) for n, t in self.weights.items()}

    def wake_up(self, tags: list[str] | None = None) -> None:
        tags = list(tags or ["weights", "kv_cache"])
        self.events.append(f"wake_up({','.join(tags)})")
        self.awake.update(tags)

    def reset_prefix_cache(self) -> None:
        self.events.append("reset_prefix_cache")
        self.cache_fresh = True

    def generate(self, prompts, params, use_tqdm: bool = True):
        self.events.append("generate")
        if self.awake != {"weights", "kv_cache"}:
            raise RuntimeError(f"generate with only {sorted(self.awake)} awake")
        assert not self.reloading, "generate during a reload"
        assert self.cache_fresh, "generate on a prefix cache of the old weights"
        outs = []
        for p in prompts:
            comps = []
            for i in range(params.n):
                toks, lps = greedy_chain(self.weights, p.prompt_token_ids, params.max_tokens)
                comps.append(SimpleNamespace(
                    index=i, token_ids=toks, finish_reason="length",
                    logprobs=[{t: SimpleNamespace(logprob=lp)} for t, lp in zip(toks, lps)]))
            outs.append(SimpleNamespace(outputs=comps))
        return outs


class FakeBuffer:
    """A Megatron-Core param/grad buffer that logs offload / reload."""

    def __init__(self, events: list) -> None:
        self.events, self.params = events, set()
        self.param_data = self.grad_data = SimpleNamespace(is_cuda=True)  # a GPU buffer's

    def offload_to_cpu(self, move_params: bool = True, move_grads: bool = True) -> None:
        self.events.append(f"offload_model(params={move_params},grads={move_grads})")

    def reload_from_cpu(self, move_params: bool = True, move_grads: bool = True) -> None:
        self.events.append(f"reload_model(params={move_params},grads={move_grads})")


class FakeOptimizer:
    def __init__(self, events: list) -> None:
        self.events = events

    def offload_to_cpu(self) -> None:
        self.events.append("offload_optimizer")

    def restore_from_cpu(self) -> None:
        self.events.append("restore_optimizer")


def fake_ddp(events: list) -> SimpleNamespace:
    return SimpleNamespace(buffers=[FakeBuffer(events)], expert_parallel_buffers=[],
                           parameters=lambda: iter(()))
