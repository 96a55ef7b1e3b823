"""Peak memory and step time of LoRA vs full training on the same model.

    .venv/bin/python bench/memory.py [--layers 4] [--seq 256] [--steps 3] [--rank 8]

One script, one model config; each mode runs in its own child process (started by this script)
so that each peak is that mode's own: a process's high-water mark never goes down, so measuring
two modes in one process would report the larger for both. Each child builds the same model
(tiny-Qwen2-VL "bench" variant: hidden 1024, 16 heads, 4 KV heads, MLP 2816; fp32, one rank),
runs 1 warm-up and ``--steps`` timed steps of Megatron-Core's forward_backward_func + AdamW, and
reports:

* ``train_peak_mb``: VmHWM at the end minus VmRSS after the model is built (memory that training
  itself adds: gradients, optimizer state, activations);
* ``state_mb``: bytes of gradients + Adam state of the trainable parameters (analytic);
* ``step_s``: median step time.

CPU numbers measure the arithmetic and bookkeeping that adapters remove (no weight gradients for
the frozen base, optimizer state only for adapters); GPU memory ratios follow the same terms.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def child(args: argparse.Namespace) -> dict:
    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from transformers import AutoConfig

    from mvlm.convert.bridge import load_hf_weights
    from mvlm.models.positions import batch_position_ids
    from mvlm.models.vlm import build_model
    from mvlm.runtime.parallel import ParallelLayout
    from mvlm.runtime.startup import startup

    torch.set_num_threads(args.threads)
    startup(ParallelLayout(), seed=0, device="cpu")
    cfg = AutoConfig.from_pretrained(args.hf)
    bundle = build_model(cfg, ParallelLayout(), dtype=torch.float32, device="cpu",
                         perform_initialization=False)
    load_hf_weights(bundle, args.hf)
    report = None
    if args.child == "lora":
        from mvlm.tuners import AdapterConfig, apply_adapters

        report = apply_adapters(bundle, AdapterConfig(rank=args.rank, alpha=2 * args.rank,
                                                      target_modules=["all-linear"]))
    params = [p for m in bundle.models for p in m.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in params)
    n_total = sum(p.numel() for m in bundle.models for p in m.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 600, (1, args.seq), generator=g)  # below the special tokens
    labels = torch.roll(ids, -1, 1)
    pos = batch_position_ids(cfg, ids, None)
    fb = get_forward_backward_func()
    rss_built = _status_kb("VmRSS")

    def step_fn(it, model):
        b = next(it)
        loss = model(b[0], b[1], labels=b[2])
        return loss, lambda t: (t.mean(), {"loss": t.mean().detach()})

    times = []
    for i in range(args.steps + 1):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=False)
        fb(forward_step_func=step_fn, data_iterator=iter([(ids, pos, labels)]),
           model=bundle.models, num_microbatches=1, seq_length=args.seq, micro_batch_size=1,
           forward_only=False)
        opt.step()
        if i:
            times.append(time.perf_counter() - t)
    hwm = _status_kb("VmHWM")
    return {"mode": args.child, "trainable": n_train, "total": n_total,
            "state_mb": round(n_train * 4 * 3 / 2**20, 1),  # grad + exp_avg + exp_avg_sq
            "rss_built_mb": round(rss_built / 1024, 1),
            "train_peak_mb": round((hwm - rss_built) / 1024, 1),
            "step_s": round(statistics.median(times), 3),
            "report": str(report) if report else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hf", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    from mvlm.testing.tiny_models import build_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        hf = build_tiny_checkpoint("qwen2_vl", Path(tmp) / "hf", variant="bench",
                                   num_hidden_layers=args.layers)
        res = {}
        for mode in ("full", "lora"):
            cmd = [sys.executable, __file__, "--child", mode, "--hf", str(hf),
                   "--seq", str(args.seq), "--steps", str(args.steps), "--rank", str(args.rank),
                   "--threads", str(args.threads)]
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if out.returncode or not line:
                raise SystemExit(f"{mode} run failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
            res[mode] = json.loads(line[0][len("RESULT "):])
    f, lo = res["full"], res["lora"]
    print(f"model: qwen2_vl bench variant, {args.layers} layers, {f['total']:,} params, fp32, "
          f"seq {args.seq}, 1 rank, {args.threads} threads")
    print(f"{'mode':6} {'trainable':>12} {'grad+Adam MB':>13} {'train peak MB':>14} "
          f"{'step s':>8}")
    for r in (f, lo):
        print(f"{r['mode']:6} {r['trainable']:>12,} {r['state_mb']:>13} {r['train_peak_mb']:>14} "
              f"{r['step_s']:>8}")
    print(f"lora/full: train peak {lo['train_peak_mb'] / max(f['train_peak_mb'], 1e-9):.3f}, "
          f"step time {lo['step_s'] / f['step_s']:.3f}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
