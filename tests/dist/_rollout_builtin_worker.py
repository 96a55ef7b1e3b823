"""Worker for tests/dist/test_rollout_builtin.py (torchrun, 2 ranks, gloo, CPU, fp32).

For each case (a tiny HF checkpoint, its prompts saved by the test, and a layout: TP1 = two
independent data-parallel engines, TP2, PP2) the model is built and loaded from the HF dir, and
the built-in engine runs:

* greedy, without and with a repetition penalty (compared with transformers in the test);
* sampled (temperature 0.7, 2 generations per prompt, seed 11) twice with the same seed and once
  with another; each completion is then re-scored by a full-sequence forward of prompt +
  completion (no KV cache: the trainer's view) and the engine's log-probs compared with it;
* top-k 1 at temperature 1 (must equal greedy);
* greedy with a stop token chosen from row 0's greedy output (row 0 must stop there);
* two greedy-only cases: TP2 with sequence parallelism (switched off for the call and restored
  after, with train mode) and PP2 x VPP2 (4 layers, the chunks in schedule order);
* TP1 / TP2 only: every weight streamed out with iter_hf_tensors, the model zeroed, the stream
  fed to ``load_weights``, greedy again (must be unchanged);
* ``logprobs_only`` cases (LLaVA-NeXT tiles): only the sampled run and its trainer re-scoring.

Results of all ranks go to spec["out"] (JSON) on rank 0.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from _worker_common import worker_process_group, write_gathered


def trainer_logprobs(bundle, prompt: dict, completion: list[int], temperature: float
                     ) -> list[float] | None:
    """log_softmax(logits / T) at each completion token from one full-sequence forward."""
    from mvlm.convert.verify import mcore_forward
    from mvlm.rl.rollout.builtin import sequence_positions

    media = {k: v for k, v in prompt.items() if k != "input_ids"}
    ids = torch.tensor(prompt["input_ids"] + completion, dtype=torch.long)[None]
    batch = {"input_ids": ids,
             "position_ids": sequence_positions(bundle.hf_config, ids[0], media)[:, None],
             **media}
    logits = mcore_forward(bundle, batch)
    if logits is None:
        return None
    P = len(prompt["input_ids"])
    lp = torch.log_softmax(logits[0].double() / temperature, dim=-1)
    rows = lp[P - 1: P - 1 + len(completion)]
    return rows.gather(-1, torch.tensor(completion)[:, None]).squeeze(-1).tolist()


def comps(groups) -> list[dict]:
    return [{"ids": c.token_ids, "lp": c.logprobs, "slp": c.sampling_logprobs,
             "stop": c.stop_reason, "prompt": c.prompt_index}
            for g in groups for c in g.completions]


def sp_flags(bundle) -> list[bool]:
    """config.sequence_parallel and every module's own sequence_parallel switch."""
    return [bool(bundle.config.sequence_parallel)] + [
        bool(mod.sequence_parallel) for m in bundle.models for mod in m.modules()
        if isinstance(getattr(mod, "sequence_parallel", None), bool)]


def run_case(case: dict) -> dict:
    from transformers import AutoConfig

    from mvlm.convert.bridge import load_hf_weights
    from mvlm.models.vlm import build_model
    from mvlm.rl.rollout.base import RolloutPrompt, SamplingParams
    from mvlm.rl.rollout.builtin import (
        BuiltinRolloutEngine,
        eos_token_ids_from_hf_dir,
        media_placeholder_token_ids,
    )
    from mvlm.runtime.parallel import ParallelLayout
    from mvlm.runtime.startup import startup

    t0 = time.perf_counter()
    layout = ParallelLayout(**case["layout"])
    startup(layout, device="cpu", seed=1234)
    hf = Path(case["hf"])
    bundle = build_model(AutoConfig.from_pretrained(hf), layout, dtype=torch.float32,
                         device="cpu", perform_initialization=False,
                         sequence_parallel=case.get("sp", False))
    load_hf_weights(bundle, hf)
    raw = torch.load(case["prompts"])
    prompts = [RolloutPrompt(p["input_ids"], {k: v for k, v in p.items() if k != "input_ids"})
               for p in raw]
    T = case["max_completion_length"]
    for m in bundle.models:
        m.train()
    eng = BuiltinRolloutEngine(bundle, eos_token_ids_from_hf_dir(hf))
    out: dict = {"sp_before": sp_flags(bundle),
                 "placeholders": media_placeholder_token_ids(bundle), "hf": str(hf)}
    if case.get("logprobs_only"):
        sp = SamplingParams(num_generations=2, temperature=0.7, max_completion_length=T, seed=11)
        out["sampled"] = comps(eng.generate(prompts, sp))
        out["trainer_lp"] = [trainer_logprobs(bundle, raw[c["prompt"]], c["ids"], sp.temperature)
                             for c in out["sampled"]]
        return _finish(out, t0)
    for name, rp in (("greedy", 1.0), ("greedy_rep", 1.3)):
        out[name] = comps(eng.generate(prompts, SamplingParams(
            temperature=0.0, max_completion_length=T, repetition_penalty=rp)))
    if case.get("greedy_only"):
        # the engine switched sequence parallelism off for the call: it must be back on
        out["sp_after"] = sp_flags(bundle)
        out["training_restored"] = all(m.training for m in bundle.models)
        return _finish(out, t0)
    sp = SamplingParams(num_generations=2, temperature=0.7, max_completion_length=T, seed=11)
    out["sampled"] = comps(eng.generate(prompts, sp))
    out["sampled_again"] = comps(eng.generate(prompts, sp))
    out["sampled_seed12"] = comps(eng.generate(prompts, SamplingParams(
        num_generations=2, temperature=0.7, max_completion_length=T, seed=12)))
    trainer = []
    for c in out["sampled"]:
        trainer.append(trainer_logprobs(bundle, raw[c["prompt"]], c["ids"], sp.temperature))
    out["trainer_lp"] = trainer
    out["topk1"] = comps(eng.generate(prompts, SamplingParams(
        temperature=1.0, top_k=1, max_completion_length=T, seed=5)))
    # A stop token from row 0's greedy output (step 2) that row 1 never produces.
    g0, g1 = out["greedy_rep"][0]["ids"], out["greedy_rep"][1]["ids"]
    stop = next((t for t in g0[2:] if t not in g1), None)
    out["stop_token"] = stop
    if stop is not None:
        eng_stop = BuiltinRolloutEngine(bundle, [stop])
        out["eos_run"] = comps(eng_stop.generate(prompts, SamplingParams(
            temperature=0.0, max_completion_length=T, repetition_penalty=1.3)))
    if layout.pp == 1:
        from mvlm.convert.stream import iter_hf_tensors

        weights = [(n, t.clone()) for n, t in iter_hf_tensors(bundle, receivers="owners")]
        with torch.no_grad():
            for m in bundle.models:
                for p in m.parameters():
                    p.zero_()
        out["zeroed"] = comps(eng.generate(prompts[:1], SamplingParams(
            temperature=0.0, max_completion_length=3)))
        out["version"] = eng.load_weights(weights)
        out["reloaded"] = comps(eng.generate(prompts, SamplingParams(
            temperature=0.0, max_completion_length=T, repetition_penalty=1.3)))
    return _finish(out, t0)


def _finish(out: dict, t0: float) -> dict:
    from megatron.core import parallel_state

    out["last_stage"] = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    # Not drop_groups: the engine's one-rank groups (rollout/builtin.py) are created once per
    # process and reused by the next case; worker_process_group destroys them at the end.
    parallel_state.destroy_model_parallel()
    dist.barrier()
    out["seconds"] = time.perf_counter() - t0
    return out


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    with worker_process_group():
        write_gathered(spec["out"], {name: run_case(case) for name, case in spec["cases"].items()})


if __name__ == "__main__":
    main()
