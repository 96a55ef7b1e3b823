"""Trainer side of tests/e2e/test_vllm_server.py (torchrun, 2 ranks, PP2, gloo, CPU, fp32).

Against a running ``mvlm rollout`` server on the same tiny Qwen2 checkpoint:

1. vLLM greedy vs transformers greedy on the test prompts (rank 0);
2. vLLM sampled completions (temperature 1, 2 per prompt) re-scored by the Megatron model (the
   trainer's full-sequence forward): engine vs trainer token_mult_prob_error;
3. every Megatron parameter perturbed (seeded noise), weights pushed with
   ``load_weights(iter_hf_tensors(bundle, receivers="rank0"))`` (both stages own tensors, rank 0
   sends) in small buckets with ``check_weight_sync``; vLLM greedy on the same prompts (a stale
   prefix cache would replay the old weights) vs transformers greedy of the perturbed weights
   (collected from the same stream on rank 0); sampled log-probs vs the perturbed trainer again;
4. faulty syncs: one tensor dropped, one renamed, one mis-shaped: each must fail naming it, and
   leave the engine refusing to generate; then a good sync makes it serve again.

Rank 0 writes the results to spec["out"] (JSON).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist


def trainer_logprobs(bundle, prompt: list[int], completion: list[int], temperature: float):
    """log_softmax(logits / T) at each completion token from one full-sequence forward (last
    pipeline stage; None elsewhere)."""
    from mvlm.convert.verify import mcore_forward
    from mvlm.rl.rollout.builtin import sequence_positions

    ids = torch.tensor(prompt + completion, dtype=torch.long)[None]
    pos = sequence_positions(bundle.hf_config, ids[0])[:, None]
    batch = {"input_ids": ids, "position_ids": pos}
    logits = mcore_forward(bundle, batch)
    if logits is None:
        return None
    P = len(prompt)
    lp = torch.log_softmax(logits[0].double() / temperature, dim=-1)
    rows = lp[P - 1: P - 1 + len(completion)]
    return rows.gather(-1, torch.tensor(completion)[:, None]).squeeze(-1).tolist()


def mismatch(bundle, prompts, groups, temperature) -> dict | None:
    """token_mult_prob_error of the engine's log-probs against the trainer's (every rank calls;
    the last stage computes; result gathered to every rank)."""
    from mvlm.rl.rollout.base import token_mult_prob_error

    eng, tr = [], []
    for g in groups:
        for c in g.completions:
            lp = trainer_logprobs(bundle, list(prompts[g.prompt_index]), c.token_ids, temperature)
            if lp is not None:
                eng += c.logprobs
                tr += lp
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (eng, tr))
    eng, tr = next((e, t) for e, t in everyone if e)
    mean, mx = token_mult_prob_error(torch.tensor(eng), torch.tensor(tr))
    return {"token_mult_prob_error": mean, "max_abs_dlogp": mx, "tokens": len(eng)}


def hf_greedy(hf_dir: Path, state: dict | None, prompts, max_new: int,
              repetition_penalty: float = 1.0) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    if state is not None:
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected, unexpected
        assert set(missing) <= {"lm_head.weight"}, missing
        model.tie_weights()
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            g = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                               max_new_tokens=max_new, pad_token_id=model.config.eos_token_id,
                               repetition_penalty=repetition_penalty)
            out.append(g[0, len(p):].tolist())
    return out


def strip_after_eos(tokens: list[int], eos: list[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[:i + 1]
    return tokens


def main() -> None:
    from transformers import AutoConfig

    from mvlm.convert.bridge import load_hf_weights
    from mvlm.convert.stream import iter_hf_tensors
    from mvlm.models.vlm import build_model
    from mvlm.rl.rollout.base import RolloutPrompt, SamplingParams
    from mvlm.rl.rollout.builtin import eos_token_ids_from_hf_dir
    from mvlm.rl.rollout.vllm_server import (
        RolloutServerError,
        VLLMServerConfig,
        VLLMServerEngine,
    )
    from mvlm.runtime.parallel import ParallelLayout
    from mvlm.runtime.startup import startup

    spec = json.loads(Path(sys.argv[1]).read_text())
    hf = Path(spec["hf"])
    startup(ParallelLayout(pp=2), device="cpu", seed=1234)
    me = dist.get_rank()
    bundle = build_model(AutoConfig.from_pretrained(hf), ParallelLayout(pp=2),
                         dtype=torch.float32, device="cpu", perform_initialization=False)
    load_hf_weights(bundle, hf)
    eos = eos_token_ids_from_hf_dir(hf)
    T = spec["max_completion_length"]
    prompts = spec["prompts"]
    rprompts = [RolloutPrompt(p) for p in prompts]
    out: dict = {}
    cfg = VLLMServerConfig(vllm_server_port=spec["port"], vllm_server_timeout=600,
                           weight_sync_bucket_mb=spec["bucket_mb"], check_weight_sync=True)
    t0 = time.perf_counter()
    eng = VLLMServerEngine(cfg, group=dist.group.WORLD)
    out["wait_seconds"] = time.perf_counter() - t0
    greedy = SamplingParams(temperature=0.0, max_completion_length=T)
    # a repetition penalty: the engine re-scores for the trainer-view log-probs
    greedy_rep = SamplingParams(temperature=0.0, max_completion_length=T, repetition_penalty=1.3)
    sampled = SamplingParams(num_generations=2, temperature=1.0, max_completion_length=T,
                             seed=7)

    def run_greedy(params=greedy):
        return [g.completions[0] for g in eng.generate(rprompts, params)]

    g0 = run_greedy()
    out["vllm_greedy"] = [c.token_ids for c in g0]
    out["vllm_greedy_stop"] = [c.stop_reason for c in g0]
    out["vllm_greedy_lp"] = [c.logprobs for c in g0]
    out["vllm_greedy_lp_mismatch"] = mismatch(bundle, prompts, eng.generate(rprompts, greedy), 1.0)
    gr = eng.generate(rprompts, greedy_rep)
    out["vllm_greedy_rep"] = [g.completions[0].token_ids for g in gr]
    out["vllm_greedy_rep_lp_mismatch"] = mismatch(bundle, prompts, gr, 1.0)
    s0 = eng.generate(rprompts, sampled)
    out["sampled_lp_mismatch"] = mismatch(bundle, prompts, s0, 1.0)
    out["sampled_slp_equal_lp"] = all(c.logprobs == c.sampling_logprobs
                                      for g in s0 for c in g.completions)
    if me == 0:
        out["hf_greedy"] = [strip_after_eos(t, eos) for t in hf_greedy(hf, None, prompts, T)]
        out["hf_greedy_rep"] = [strip_after_eos(t, eos)
                                for t in hf_greedy(hf, None, prompts, T, 1.3)]

    # --- perturb the trainer's weights and sync ---
    # (not the tied word embeddings: stage 0's embedding and the last stage's output copy must
    # stay equal, as training keeps them)
    gen = torch.Generator().manual_seed(100 + me)
    with torch.no_grad():
        for m in bundle.models:
            for n, p in m.named_parameters():
                if "word_embeddings" in n or "output_layer" in n:
                    continue
                p.add_(torch.randn(p.shape, generator=gen) * (0.5 * p.std().clamp(min=1e-3)))
    t0 = time.perf_counter()
    version = eng.load_weights(iter_hf_tensors(bundle, receivers="rank0"))
    out["sync_seconds"] = time.perf_counter() - t0
    out["version"] = version
    out["last_sync"] = eng.last_sync
    g1 = run_greedy()
    out["vllm_greedy_after"] = [c.token_ids for c in g1]
    out["vllm_greedy_lp_after"] = [c.logprobs for c in g1]
    out["vllm_greedy_rep_after"] = [c.token_ids for c in run_greedy(greedy_rep)]
    state = {n: t.clone() for n, t in iter_hf_tensors(bundle, receivers="rank0")}
    if me == 0:
        out["hf_greedy_after"] = [strip_after_eos(t, eos)
                                  for t in hf_greedy(hf, state, prompts, T)]
        out["hf_greedy_rep_after"] = [strip_after_eos(t, eos)
                                      for t in hf_greedy(hf, state, prompts, T, 1.3)]
        back = eng.read_weights(sorted(state))
        out["readback_max_diff"] = max(float((back[n] - state[n]).abs().max()) for n in state)
    out["sampled_lp_mismatch_after"] = mismatch(bundle, prompts, eng.generate(rprompts, sampled),
                                                1.0)

    # --- faulty syncs ---
    victim = "model.layers.1.mlp.down_proj.weight"  # owned by the second pipeline stage

    def faulty(kind: str):
        for n, t in iter_hf_tensors(bundle, receivers="rank0"):
            if n == victim:
                if kind == "drop":
                    continue
                if kind == "rename":
                    n = n.replace("down_proj", "down_projection")
                if kind == "shape":
                    t = t[:, :-1]
            yield n, t

    cfg_fast = VLLMServerConfig(vllm_server_port=spec["port"],
                                weight_sync_bucket_mb=spec["bucket_mb"])
    eng2 = VLLMServerEngine(cfg_fast, group=dist.group.WORLD)
    for kind in ("drop", "rename", "shape"):
        try:
            eng2.load_weights(faulty(kind))
            out[f"fault_{kind}"] = None
        except RolloutServerError as e:
            out[f"fault_{kind}"] = str(e)
        try:
            eng2.generate(rprompts[:1], greedy)
            out[f"fault_{kind}_generate"] = None
        except RolloutServerError as e:
            out[f"fault_{kind}_generate"] = str(e)
    out["victim"] = victim
    eng2.load_weights(iter_hf_tensors(bundle, receivers="rank0"))
    out["vllm_greedy_recovered"] = [c.token_ids for c in run_greedy()]
    if me == 0:
        Path(spec["out"]).write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
