"""Worker for tests/dist/test_colocate_sync.py::test_colocate_pp2_sync_rollout_fault
(torchrun, 2 ranks, gloo, CPU, fp32).

A PP2 Megatron model of a tiny Qwen2 (each rank owns half the layers), loaded from the HF dir
and scaled by 1.5 (a change of every tensor whose HF value is known: the Qwen2 mapping is
linear), pushed into a colocated engine on *each* rank -- the in-process stand-in for vllm.LLM
of tests/fake_vllm.py -- through ColocateEngine.push_policy: the real weight stream (owners
gather, rank 0 receives, every rank cuts the same buckets from the plan, rank 0 broadcasts).
Then a rollout on both ranks, a manifest fault and an engine fault on rank 1 alone (every rank
raises the same error, none hangs) and a complete sync after them. Each rank's record goes to
spec["out"] (JSON) from rank 0.
"""
from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from fake_vllm import FakeLLM, greedy_chain, install_fake_vllm_module
    from transformers import AutoConfig

    from mvlm.convert.bridge import load_hf_weights
    from mvlm.models.vlm import build_model
    from mvlm.rl.rollout.base import RolloutPrompt, SamplingParams
    from mvlm.rl.rollout.colocate import ColocateConfig, ColocateEngine, ColocateError
    from mvlm.runtime.parallel import ParallelLayout
    from mvlm.runtime.startup import startup

    install_fake_vllm_module()
    spec = json.loads(Path(sys.argv[1]).read_text())
    hf = Path(spec["hf"])
    startup(ParallelLayout(pp=2), device="cpu", seed=1234)
    bundle = build_model(AutoConfig.from_pretrained(hf), ParallelLayout(pp=2),
                         dtype=torch.float32, device="cpu", perform_initialization=False)
    load_hf_weights(bundle, hf)
    with torch.no_grad():
        for m in bundle.models:
            for p in m.parameters():
                p.mul_(1.5)
    want = {n: t * 1.5 for n, t in FakeLLM(hf).weights.items()}

    events: list = []
    llm = FakeLLM(hf, events=events)
    trainer = SimpleNamespace(bundle=bundle, src_dir=hf, pad_id=0, step=0, skipped=0,
                              ddp_models=[], optimizer=None)
    cfg = ColocateConfig(sleep_level=1, weight_sync_bucket_mb=spec["bucket_mb"],
                         check_weight_sync=True)
    eng = ColocateEngine(cfg, trainer, llm=llm)
    rec: dict = {"group_size": dist.get_world_size(eng.group)}
    eng.before_rollout(trainer)
    loaded = [(n, t) for b in llm.buckets for n, t in b]
    rec["loaded"] = dict(Counter(n for n, _ in loaded))
    rec["unequal"] = [n for n, t in loaded if not torch.equal(t, want[n])]
    rec["bucket_bytes"] = [sum(t.numel() * t.element_size() for _, t in b) for b in llm.buckets]
    rec["bucket_lens"] = [len(b) for b in llm.buckets]
    rec["limit"] = eng.limit
    rec["last_sync"] = {k: v for k, v in eng.last_sync.items() if k != "seconds"}
    prompts = [[5, 9, 3], [7]]
    groups = eng.generate([RolloutPrompt(p) for p in prompts],
                          SamplingParams(num_generations=2, max_completion_length=4,
                                         temperature=0.0))
    rec["tokens"] = [[c.token_ids for c in g.completions] for g in groups]
    rec["want_tokens"] = [[greedy_chain(want, p, 4)[0]] * 2 for p in prompts]
    rec["events"] = list(events)

    # a mis-shaped manifest entry: every rank fails naming it, the stream is drained (no hang)
    name = "model.layers.1.mlp.down_proj.weight"
    good = dict(eng.manifest)
    shape, dt = good[name]
    eng.manifest = dict(good, **{name: ([shape[0], shape[1] + 1], dt)})
    trainer.step = 1
    try:
        eng.before_rollout(trainer)
        rec["fault"] = None
    except ColocateError as e:
        rec["fault"] = str(e)
    try:
        eng.generate([RolloutPrompt([7])], SamplingParams(temperature=0.0,
                                                          max_completion_length=2))
        rec["stale_generate"] = None
    except ColocateError as e:
        rec["stale_generate"] = str(e)
    eng.manifest = good
    # rank 1's engine alone fails to load a tensor: both ranks raise the same error, no hang
    if dist.get_rank() == 1:
        llm.fail_load = name
    try:
        eng.before_rollout(trainer)
        rec["engine_fault"] = None
    except ColocateError as e:
        rec["engine_fault"] = str(e)
    llm.fail_load = None
    eng.before_rollout(trainer)  # a complete sync restores it
    rec["after_fault_version"] = eng.weight_version
    rec["after_fault_tokens"] = eng.generate(
        [RolloutPrompt([7])], SamplingParams(temperature=0.0, max_completion_length=4)
    )[0].completions[0].token_ids

    recs = [None] * dist.get_world_size()
    dist.all_gather_object(recs, rec)
    if dist.get_rank() == 0:
        Path(spec["out"]).write_text(json.dumps(recs))
        print("WORKER OK", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
