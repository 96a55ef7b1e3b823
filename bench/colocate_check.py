"""GPU check of GRPO's ``--use_vllm true --vllm_mode colocate`` (the colocate step of
scripts/gpu_check.sh; needs a CUDA GPU and vLLM importable in this Python).

Why a separate check: colocate mode cannot run on a CPU box (vLLM's CPU build pins another torch
and has no sleep mode), so CI tests its orchestration against an in-process stand-in for
``vllm.LLM``; this runs the same code with the real engine. Two short GRPO runs on a tiny random
Qwen2 (bf16, one GPU), one per sleep level that changes the flow:

* ``--sleep_level 1 --offload_model --offload_optimizer``: weights slept to CPU RAM and woken,
  trainer model and optimizer offloaded around each rollout;
* ``--sleep_level 2``: the engine's weights are freed at every sleep and synced again.

Both with ``--check_weight_sync true`` (every sync read back from the engine and compared) and a
small ``--weight_sync_bucket_mb``. It passes when each run exits 0, logs one read-back-equal sync
per rollout, and the engine vs trainer ``token_mult_prob_error`` of every step is <= 1.01 (the
issue's gate; same dtype on both sides). Prints one line per run and ``colocate check: OK`` or
``colocate check: FAILED ...`` (exit 1).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

PLUGIN = '''from swift.plugin import ORM, orms


class EvenTokens(ORM):
    def __call__(self, completions, response_token_ids, **kwargs):
        return [sum(t % 2 == 0 for t in ids) / max(1, len(ids)) for ids in response_token_ids]


orms['even_tokens'] = EvenTokens
'''
PROMPTS = ("Count to five.", "Name a colour.", "2+2?", "Say hi.")
RUNS = {"sleep1_offload": ["--sleep_level", "1", "--offload_model", "true",
                           "--offload_optimizer", "true"],
        "sleep2": ["--sleep_level", "2"]}
SYNC_LINE = re.compile(r"weight sync -> colocated vLLM: version (\d+) at step (\d+), (\d+) "
                       r"tensors, ([\d.]+) MB in (\d+) buckets, ([\d.]+) s"
                       r"(, (\d+) read back equal)?")


def grpo_cmd(work: Path, hf: Path, out: Path, steps: int, extra: list[str]) -> list[str]:
    (work / "plugin.py").write_text(PLUGIN)
    data = work / "rl.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}]}) + "\n"
                            for q in PROMPTS))
    return [sys.executable, "-m", "mvlm", "rlhf", "--rlhf_type", "grpo", "--model", str(hf),
            "--dataset", str(data), "--external_plugins", str(work / "plugin.py"),
            "--reward_funcs", "even_tokens", "--num_generations", "4",
            "--max_completion_length", "16", "--temperature", "1.0", "--top_k", "-1",
            "--top_p", "1.0", "--beta", "0", "--use_vllm", "true", "--vllm_mode", "colocate",
            "--vllm_gpu_memory_utilization", "0.3", "--vllm_max_model_len", "256",
            "--weight_sync_bucket_mb", "0.5", "--check_weight_sync", "true",
            "--torch_dtype", "bfloat16", "--micro_batch_size", "2", "--global_batch_size", "2",
            "--lr", "5e-3", "--lr_decay_style", "constant", "--lr_warmup_iters", "0",
            "--max_length", "128", "--seed", "0", "--train_iters", str(steps),
            "--output_dir", str(out), "--report_to", "none", "--disable_tqdm", "true", *extra]


def check_run(name: str, work: Path, hf: Path, steps: int, extra: list[str]) -> list[str]:
    """Run one GRPO command; the problems found (empty: it passed)."""
    work.mkdir(parents=True, exist_ok=True)
    out = work / "out"
    t0 = time.perf_counter()
    p = subprocess.run(grpo_cmd(work, hf, out, steps, extra), capture_output=True, text=True,
                       timeout=1800, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    wall = time.perf_counter() - t0
    (work / "run.log").write_text(p.stdout + p.stderr)
    if p.returncode != 0:
        return [f"{name}: exit {p.returncode}; last lines:\n{(p.stdout + p.stderr)[-3000:]}"]
    syncs = [m for m in SYNC_LINE.finditer(p.stdout + p.stderr)]
    recs = [json.loads(x) for x in (out / "logging.jsonl").read_text().splitlines() if x.strip()]
    recs = [r for r in recs if "token_mult_prob_error" in r]
    problems = []
    if len(recs) < steps:
        problems.append(f"{name}: {len(recs)} steps logged a mismatch, expected {steps}")
    worst = max((r["token_mult_prob_error"] for r in recs), default=float("nan"))
    if not worst <= 1.01:
        problems.append(f"{name}: token_mult_prob_error up to {worst} (> 1.01)")
    if len(syncs) < steps or any(m.group(8) is None for m in syncs):
        problems.append(f"{name}: {len(syncs)} syncs logged for {steps} rollouts, read-back on "
                        f"{sum(m.group(8) is not None for m in syncs)}")
    mb = max((float(m.group(4)) for m in syncs), default=0.0)
    print(f"colocate {name}: exit 0 in {wall:.0f} s, {len(syncs)} syncs ({mb:.1f} MB, "
          f"{max((int(m.group(5)) for m in syncs), default=0)} buckets, "
          f"{max((float(m.group(6)) for m in syncs), default=0.0):.2f} s at most, all read back "
          f"equal: {all(m.group(8) for m in syncs)}), token_mult_prob_error max {worst:.5f}",
          flush=True)
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work_dir", default="colocate_check")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("colocate check: skipped (no CUDA device)")
        return 3
    from mvlm.testing.tiny_models import build_tiny_checkpoint

    work = Path(args.work_dir).resolve()
    # head_dim 32 (hidden 128 / 4 heads): a size vLLM's attention backends all support
    hf = build_tiny_checkpoint("qwen2", work / "hf", num_attention_heads=4,
                               num_key_value_heads=2)
    problems = []
    for name, extra in RUNS.items():
        problems += check_run(name, work / name, hf, args.steps, extra)
    if problems:
        print("colocate check: FAILED\n" + "\n".join(problems), flush=True)
        return 1
    print("colocate check: OK", flush=True)
    return 0


if __name__ == "__main__":  # vLLM may start worker processes: the guard is required
    sys.exit(main())
